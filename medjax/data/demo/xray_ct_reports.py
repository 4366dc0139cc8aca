"""Synthetic, unpaired chest X-ray-report and chest CT-report demo data in the real formats, for UniMedI
(He et al., ECCV 2024: MIMIC-CXR-like 2D and BIMCV-like 3D sets).

`make_xray_ct_reports_demo(out_dir)` writes
- `xray/images/NNNNN.png`: 8-bit grayscale frontal "radiographs" (two dark lung fields in a bright body,
  a heart shadow) with findings: an opacity (a bright blob) in one of four lung zones (upper/lower x
  left/right), a pleural effusion (a bright meniscus at one lung base), both, or none;
- `xray/manifest.jsonl`: `{"image", "captions": [report], "labels": [opacity, effusion], "split"}`;
- `ct/volumes/NNNNN.nii.gz`: int16 HU chest CTs (air, soft tissue, lungs at -850 HU, spine) with a nodule
  (+60 HU sphere) in one lung zone and/or an effusion (fluid in the posterior base of one lung), RAS affine;
- `ct/manifest.jsonl`: `{"volume", "captions": [report], "labels": [nodule, effusion], "split"}`;
- `tokenizer/`: a byte-level BPE tokenizer (RoBERTa special tokens) trained on the reports;
- `.complete` (written last, holding the arguments).
Each report says what is where ("There is an opacity in the right upper zone. No pleural effusion."), so
image-report contrast is learnable; splits 80/10/10. Deterministic given `seed`.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
from PIL import Image
from scipy import ndimage

from medjax.data.readers.ct import save_nifti
from medjax.data.demo import build_demo
from medjax.data.demo.image_report import train_tokenizer

ZONES = [(v, h) for v in ("upper", "lower") for h in ("right", "left")]  # patient's right = image left
XRAY_LABELS = ("opacity", "pleural effusion")
CT_LABELS = ("nodule", "pleural effusion")


def _splits(n: int, rng: np.random.Generator) -> list[str]:
    order = rng.permutation(n)
    split = ["train"] * n
    for i in order[int(0.8 * n):int(0.9 * n)]:
        split[i] = "val"
    for i in order[int(0.9 * n):]:
        split[i] = "test"
    return split


def _findings(rng: np.random.Generator) -> dict:
    kind = int(rng.integers(4))  # 0 normal, 1 lesion, 2 effusion, 3 both
    return {"lesion": ZONES[int(rng.integers(4))] if kind in (1, 3) else None,
            "effusion": ("right", "left")[int(rng.integers(2))] if kind in (2, 3) else None}


def _report(f: dict, lesion_word: str, zone_word: str, rng: np.random.Generator) -> str:
    parts = []
    if f["lesion"]:
        v, h = f["lesion"]
        parts.append(f"There is {'an' if lesion_word[0] in 'aeiou' else 'a'} {lesion_word} in the {h} {v} {zone_word}.")
    else:
        parts.append(f"No focal {lesion_word}." if rng.random() < 0.5 else f"The lungs are clear without {lesion_word}.")
    parts.append(f"Small {f['effusion']} pleural effusion." if f["effusion"] else "No pleural effusion.")
    return " ".join(parts)


def render_xray(f: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8 frontal radiograph; the patient's right lung on the image's left."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.full((size, size), 25.0)
    image[((x - 0.5) / 0.44) ** 2 + ((y - 0.55) / 0.48) ** 2 <= 1] = 170.0  # body
    lungs = {}
    for side, cx in (("right", 0.3), ("left", 0.7)):
        lungs[side] = ((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2 <= 1
        image[lungs[side]] = 60.0
    image[((x - 0.56) / 0.12) ** 2 + ((y - 0.68) / 0.1) ** 2 <= 1] = 185.0  # heart shadow
    if f["lesion"]:
        v, h = f["lesion"]
        cx = (0.3 if h == "right" else 0.7) + rng.normal(0, 0.02)
        cy = (0.38 if v == "upper" else 0.62) + rng.normal(0, 0.02)
        r = rng.uniform(0.05, 0.08)
        blob = ((x - cx) ** 2 + (y - cy) ** 2) <= r ** 2
        image[blob & lungs[h]] = 200.0
    if f["effusion"]:
        base = lungs[f["effusion"]] & (y > 0.66 + rng.normal(0, 0.01))
        image[base] = 175.0
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_ct(f: dict, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(x, y, z) int16 HU chest CT in RAS voxel order (x: patient's left, y: anterior, z: superior)."""
    u, v, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(u / 0.9) ** 2 + (v / 0.7) ** 2 <= 1] = 40.0  # soft tissue
    lungs = {}
    for side, cu in (("right", -0.42), ("left", 0.42)):  # RAS: -x is the patient's right
        lungs[side] = ((u - cu) / 0.33) ** 2 + (v / 0.5) ** 2 + (w / 0.95) ** 2 <= 1
        hu[lungs[side]] = -850.0
    hu[(u / 0.12) ** 2 + ((v + 0.55) / 0.12) ** 2 <= 1] = 500.0  # spine
    if f["lesion"]:
        zone_v, side = f["lesion"]
        cu = (-0.42 if side == "right" else 0.42) + rng.normal(0, 0.03)
        cw = (0.45 if zone_v == "upper" else -0.45) + rng.normal(0, 0.05)
        cv = rng.normal(0, 0.1)
        r = rng.uniform(0.14, 0.2)
        hu[((u - cu) ** 2 + (v - cv) ** 2 + (w - cw) ** 2 <= r ** 2) & lungs[side]] = 60.0
    if f["effusion"]:
        hu[lungs[f["effusion"]] & (v < -0.2) & (w < 0.1)] = 15.0  # dependent (posterior) fluid at the base
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0, 15, shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def make_xray_ct_reports_demo(out_dir: str, *, num_xrays: int = 240, num_cts: int = 120, image_size: int = 64,
                              ct_shape: tuple[int, int, int] = (48, 48, 32), seed: int = 0) -> str:
    """Write the demo (module docstring) at `out_dir`, skipping the work when it is complete with the same
    arguments. Returns out_dir."""
    if num_xrays < 10 or num_cts < 10 or image_size < 16 or min(ct_shape) < 8:
        raise ValueError(f"need >= 10 X-rays and CTs, image_size >= 16 and ct_shape entries >= 8; got {num_xrays}, "
                         f"{num_cts}, {image_size}, {ct_shape}")
    params = {"num_xrays": num_xrays, "num_cts": num_cts, "image_size": image_size, "ct_shape": list(ct_shape),
              "seed": seed}
    write = functools.partial(_write_xray_ct_reports_demo, params=params,
                              num_xrays=num_xrays, num_cts=num_cts, image_size=image_size, ct_shape=ct_shape, seed=seed)
    return build_demo(out_dir, params, write, ("xray/manifest.jsonl", "ct/manifest.jsonl"))


def _write_xray_ct_reports_demo(out_dir: str, *, params: dict, num_xrays, num_cts, image_size, ct_shape, seed) -> None:
    """Write the files of `make_xray_ct_reports_demo` into `out_dir` (a fresh temporary directory)."""
    os.makedirs(os.path.join(out_dir, "xray", "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "ct", "volumes"), exist_ok=True)
    reports, xray_rows, ct_rows = [], [], []
    split = _splits(num_xrays, np.random.default_rng([seed, 0]))
    for i in range(num_xrays):
        rng = np.random.default_rng([seed, 1, i])
        f = _findings(rng)
        rel = f"images/{i:05d}.png"
        Image.fromarray(render_xray(f, image_size, rng)).save(os.path.join(out_dir, "xray", rel), compress_level=1)
        report = _report(f, "opacity", "zone", rng)
        reports.append(report)
        xray_rows.append({"image": rel, "captions": [report], "image_id": f"{i:05d}",
                          "labels": [int(f["lesion"] is not None), int(f["effusion"] is not None)], "split": split[i]})
    spacing = (1.5, 1.5, 2.5)
    affine = np.diag(spacing + (1.0,))
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(ct_shape) - 1) / 2.0
    split = _splits(num_cts, np.random.default_rng([seed, 2]))
    for i in range(num_cts):
        rng = np.random.default_rng([seed, 3, i])
        f = _findings(rng)
        rel = f"volumes/{i:05d}.nii.gz"
        save_nifti(os.path.join(out_dir, "ct", rel), render_ct(f, tuple(ct_shape), rng), affine)
        report = _report(f, "nodule", "lobe", rng)
        reports.append(report)
        ct_rows.append({"volume": rel, "captions": [report],
                        "labels": [int(f["lesion"] is not None), int(f["effusion"] is not None)], "split": split[i]})
    _write_jsonl(os.path.join(out_dir, "xray", "manifest.jsonl"), xray_rows)
    _write_jsonl(os.path.join(out_dir, "ct", "manifest.jsonl"), ct_rows)
    train_tokenizer(reports, os.path.join(out_dir, "tokenizer"), vocab_size=300)
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"xray_labels": list(XRAY_LABELS), "ct_labels": list(CT_LABELS), "params": params}, f, indent=1)
