"""Synthetic chest CTs with per-organ reports in the CT-RATE layout fVLM reads (Shui et al., ICLR 2025), for
`fvlm_ctrate` (and the ViSD-Boost stages).

`make_ct_reports_demo(out_dir)` writes, for each split in ("train", "valid"):
- `<split>/volumes/<split>_<n>_a_1.nii.gz`: int16 HU chest CTs (RAS affine, 1.25 x 1.25 x 3 mm) with four
  anatomies: lungs (-850 HU), heart (40 HU), esophagus (a 25 HU tube with an air lumen), aorta (a 150 HU
  tube, non-contrast), a spine and soft tissue;
- `<split>/masks/<same name>`: uint8 anatomy masks already merged to fVLM's 4 labels (1 lung, 2 heart,
  3 esophagus, 4 aorta);
- `<split>_findings.json`, `<split>_conclusions.json`: `{scan_key: {organ: text}}` (the key: the file name
  without `.nii.gz`), an empty conclusion for a normal organ (its findings end "Not <name>.", the zero-shot
  prompt's negation; `_texts`);
- `<split>_labels.csv`: `VolumeName` + CT-RATE label columns (0/1);
- `tokenizer/`: an uncased byte-level BPE tokenizer trained on the texts and the prompts; `.complete` (written last).
Findings are visible in the image: a lung nodule (a 60 HU sphere of radius 0.28-0.34 of the chest's half-width,
clipped to the named lung), cardiomegaly (a heart 1.5x wider), a hiatal hernia (a wide, air-filled lower
esophagus), arterial wall calcification (a 1000 HU ring in the aortic wall); each organ is abnormal with
probability `abnormal_rate`. Deterministic given `seed`.
The nodule is that large so that it shows in the lung's organ embedding as much as the other findings in theirs:
the lung holds ~45 of the demo's 64 tokens, and with radius 0.2-0.26 (demo v4) the mean over its tokens separated
nodule from normal scans by Cohen's d 0.43 (cardiomegaly 0.99, calcification 1.01, hernia -1.48), and the lung was
the one organ whose loss stayed at the uniform value (fvlm_ctrate demo: 2.77 = ln 16 over 300 steps); at radius
0.28-0.34 the lung's d is 0.80 (cardiomegaly 0.74, calcification 0.88, hernia -1.40 on the same scans).
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
from scipy import ndimage

from medjax.data.demo import build_demo
from medjax.data.demo.image_report import train_tokenizer
from medjax.data.readers.ct import save_nifti

ORGANS = ("lung", "heart", "esophagus", "aorta")
LABELS = ("Lung nodule", "Cardiomegaly", "Hiatal hernia", "Arterial wall calcification")  # CT-RATE columns
PROMPT_NAMES = ("nodule", "cardiomegaly", "hiatal hernia", "arterial wall calcification")  # fvlm_ctrate.DEMO_LABELS
SPACING = (1.25, 1.25, 3.0)
DEMO_VERSION = 5  # bump when the rendering changes, so cached demos are made again


def _findings(rng: np.random.Generator, rate: float) -> dict:
    return {"lung": ("right", "left")[int(rng.integers(2))] if rng.random() < rate else None,
            "heart": bool(rng.random() < rate), "esophagus": bool(rng.random() < rate),
            "aorta": bool(rng.random() < rate)}


def _texts(f: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """(findings, conclusions) per organ. Every text opens with the zero-shot prompt's own sentence: a normal
    organ's conclusion is empty and its findings start "Not <name>." (PROMPT_NAMES), an abnormal organ's
    conclusion is "<Name>."; half of the organs (drawn per organ) add a description of the finding after it.
    A text tower trained from scratch on the demo reads the prompts "Not <name>." / "<name>." only if some
    reports are those sentences whole (CXR-BERT brings its own language): with the sentence only inside longer
    texts (demo v3), the tiny test's text tower placed "Not <name>." nearer the abnormal reports than "<name>."
    for 3 of its 4 labels (zero-shot AUC 0.27 while the image embeddings ordered the scans as the reports)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    described = lambda sentence: f" {sentence}" if rng.random() < 0.5 else ""  # noqa: E731
    details = {  # organ -> (abnormal description, normal descriptions)
        "lung": (f"A solid nodule is seen in the {f['lung']} lung.", ["The lung parenchyma is clear.", "No mass in the lungs."]),
        "heart": ("The heart is enlarged.", ["Heart size is normal.", "The heart is not enlarged."]),
        "esophagus": ("The distal esophagus is widened and contains air.", ["The esophagus is unremarkable."]),
        "aorta": ("Calcified plaques in the aortic wall.", ["The aorta is normal in calibre.", "No aortic plaque."]),
    }
    desc, conc = {}, {}
    for organ, name in zip(ORGANS, PROMPT_NAMES):
        abnormal, normal = details[organ]
        if f[organ]:
            conc[organ], desc[organ] = name[0].upper() + name[1:] + ".", described(abnormal).strip()
        else:
            conc[organ], desc[organ] = "", f"Not {name}.{described(pick(normal))}"
    return desc, conc


def render(f: dict, shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, mask uint8), both (x, y, z) in RAS voxel order (x: patient's left, y: anterior, z: superior)."""
    u, v, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    jitter = lambda s=0.03: rng.normal(0, s)  # noqa: E731
    hu = np.full(shape, -1000.0)
    mask = np.zeros(shape, np.uint8)
    hu[(u / 0.92) ** 2 + (v / 0.72) ** 2 <= 1] = 40.0  # soft tissue
    lungs = {}
    for side, cu in (("right", -0.45), ("left", 0.45)):  # RAS: -x is the patient's right
        lungs[side] = ((u - cu - jitter()) / 0.32) ** 2 + (v / 0.5) ** 2 + (w / 0.85) ** 2 <= 1
        hu[lungs[side]] = -850.0
        mask[lungs[side]] = 1
    scale = 1.5 if f["heart"] else 1.0
    heart = ((u - 0.05 - jitter()) / (0.2 * scale)) ** 2 + ((v - 0.2) / 0.2) ** 2 + ((w + 0.3) / 0.3) ** 2 <= 1
    hu[heart], mask[heart] = 40.0, 2
    hu[(u / 0.1) ** 2 + ((v + 0.58) / 0.1) ** 2 <= 1] = 500.0  # spine
    eso_r = np.where((w < -0.3) & f["esophagus"], 0.13, 0.055)
    esophagus = (((u + 0.08) / eso_r) ** 2 + ((v + 0.38) / eso_r) ** 2 <= 1) & (np.abs(w) < 0.9)
    hu[esophagus], mask[esophagus] = 25.0, 3
    lumen = esophagus & (((u + 0.08) / (0.6 * eso_r)) ** 2 + ((v + 0.38) / (0.6 * eso_r)) ** 2 <= 1)
    hu[lumen & ((w < -0.3) & f["esophagus"] | (rng.random(shape) < 0.3))] = -900.0
    radial = np.sqrt(((u - 0.12) / 0.09) ** 2 + ((v + 0.3) / 0.09) ** 2)
    aorta = (radial <= 1) & (np.abs(w) < 0.9)
    hu[aorta], mask[aorta] = 45.0, 4  # non-contrast, as CT-RATE
    if f["aorta"]:
        hu[aorta & (radial > 0.5) & (rng.random(shape) < 0.8)] = 1000.0
    if f["lung"]:
        cu = (-0.45 if f["lung"] == "right" else 0.45) + jitter()
        r = rng.uniform(0.28, 0.34)  # module docstring
        hu[((u - cu) ** 2 + (v - jitter(0.1)) ** 2 + (w - rng.uniform(-0.4, 0.5)) ** 2 <= r ** 2) & lungs[f["lung"]]] = 60.0
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0, 15, shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), mask


def make_ct_reports_demo(out_dir: str, *, num_train: int = 96, num_valid: int = 24,
                         shape: tuple[int, int, int] = (56, 56, 16), abnormal_rate: float = 0.4, seed: int = 0) -> str:
    """Write the demo (module docstring) at `out_dir`, skipping the work when it is complete with the same
    arguments. Returns out_dir."""
    if num_train < 4 or num_valid < 2 or min(shape) < 8:
        raise ValueError(f"need >= 4 train and >= 2 valid scans and shape entries >= 8; got {num_train}, "
                         f"{num_valid}, {shape}")
    params = {"version": DEMO_VERSION, "num_train": num_train, "num_valid": num_valid, "shape": list(shape), "abnormal_rate": abnormal_rate,
              "seed": seed}
    def write(out_dir: str) -> None:  # into a fresh temporary directory (build_demo renames it into place)
        affine = np.diag(SPACING + (1.0,))
        affine[:3, 3] = -np.asarray(SPACING) * (np.asarray(shape) - 1) / 2.0
        texts = []
        for s, (split, count) in enumerate((("train", num_train), ("valid", num_valid))):
            findings, conclusions, rows = {}, {}, []
            for i in range(count):
                rng = np.random.default_rng([seed, s, i])
                f = _findings(rng, abnormal_rate)
                key = f"{split}_{i + 1}_a_1"
                hu, mask = render(f, tuple(shape), rng)
                save_nifti(os.path.join(out_dir, split, "volumes", f"{key}.nii.gz"), hu, affine)
                save_nifti(os.path.join(out_dir, split, "masks", f"{key}.nii.gz"), mask, affine)
                findings[key], conclusions[key] = _texts(f, rng)
                texts += list(findings[key].values()) + [c for c in conclusions[key].values() if c]
                rows.append([f"{key}.nii.gz", int(f["lung"] is not None), int(f["heart"]), int(f["esophagus"]),
                             int(f["aorta"])])
            for name, data in (("findings", findings), ("conclusions", conclusions)):
                with open(os.path.join(out_dir, f"{split}_{name}.json"), "w", encoding="utf-8") as fh:
                    json.dump(data, fh, indent=1)
            with open(os.path.join(out_dir, f"{split}_labels.csv"), "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(("VolumeName",) + LABELS)
                writer.writerows(rows)
        texts += [f"{organ} shows no significant abnormalities." for organ in ORGANS]
        texts += [p for name in PROMPT_NAMES for p in (f"Not {name}.", f"{name}.")]
        # uncased as CXR-BERT's tokenizer (do_lower_case), so "Not x." / "X." differ only by the negation; a
        # vocabulary that holds the reports' words whole (300 left words in pieces: the prompts were truncated)
        train_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size=600, lowercase=True)

    return build_demo(out_dir, params, write, ("train_findings.json", "valid_labels.csv"))
