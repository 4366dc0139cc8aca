"""Synthetic multi-dataset abdominal CT in the real formats, for the CLIP-Driven Universal Model's
partial-label training (Liu et al., ICCV 2023, arXiv 2301.00785: each dataset annotates a different
subset of the 32 classes).

`make_ct_demo(out_dir)` writes, in the original's `dataset_list` layout (ids from `medjax.ontology.universal_classes`):

    01_Multi-Atlas_Labeling/img/img0001.nii.gz + label/label0001.nii.gz   14 organs (BTCV-like; 6 cases)
    04_LiTS/img/liver_1.nii.gz + label/liver_1.nii.gz                     liver + liver tumours
    05_KiTS/img/img0001.nii.gz + label/label0001.nii.gz                   kidneys + tumour + cyst
    10_Decathlon/Task07_Pancreas/imagesTr/... + labelsTr/...              pancreas + tumour
    10_Decathlon/Task09_Spleen/imagesTr/... + labelsTr/...                spleen
    train.txt, val.txt                                                    image<TAB>label lines

Every volume shows the same miniature anatomy (the full label set is drawn, each dataset's label
keeps only its template's classes; tumours only in the tumour datasets' patients). Organs are
ellipsoids and tubes placed in patient coordinates (x right, y anterior, z superior, in units of
the body's half-width/half-depth/half-height), rendered through each file's affine, so a file
stored LPS (DICOM's axis order), LAS, RAS or axis-permuted IPL (slices first, as KiTS19 stores
them) shows its anatomy in the right place only if its affine is honoured. Voxels are 2.0-2.8 mm
in-plane and 2.5-3 mm between slices, so the anatomy is a miniature (a 48-voxel field of view).
Intensities: one HU level per organ kind, spread over the HU window in a plausible contrast-CT order so that
each organ is learnable at demo scale (ORGANS), with blur and noise.
"""
from __future__ import annotations

import functools
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from medjax.data.demo import build_demo
from medjax.data.readers.ct import save_nifti

# (dataset dir, image dir, label dir, file stem, classes labelled, axis codes, tumours drawn)
DATASETS = (
    ("01_Multi-Atlas_Labeling", "img", "label", ("img", "label"), tuple(range(1, 15)), "LPS", ()),
    ("04_LiTS", "img", "label", ("liver_", "liver_"), (6, 27), "LAS", (27,)),
    ("05_KiTS", "img", "label", ("img", "label"), (2, 3, 26, 32), "IPL", (26, 32)),
    ("10_Decathlon/Task07_Pancreas", "imagesTr", "labelsTr", ("pancreas_", "pancreas_"), (11, 28), "RAS", (28,)),
    ("10_Decathlon/Task09_Spleen", "imagesTr", "labelsTr", ("spleen_", "spleen_"), (1,), "LPS", ()),
)
AIR_HU, FAT_HU, CAVITY_HU, BONE_HU = -1000.0, -100.0, -40.0, 700.0
# class -> (kind, centre (u, v, w), radii (ru, rv, rw), HU); "ellipsoid" or "tube" (infinite along
# the axis whose radius is 0), u right, v anterior, w superior, body half-axes = 1; drawn in this
# order, later organs over earlier ones. Learnable at the demo's ~2.5 mm (issue #23; DEMO_VERSION 2): every
# organ is at least ~2 voxels in radius (a body half-axis is ~16-21 voxels), and the twelve organ kinds sit on
# distinct HU levels 22 apart (-10 ... 232, in the HU window [-175, 250]; left/right pairs share a level and differ by
# side), so intensity, shape and place all tell them apart; version 1's adrenals and veins were 4-12 voxels thin
# and six organs lay within 25 HU of the abdominal cavity, which no demo-length run learns.
ORGANS = {
    8: ("tube", (-0.12, -0.45, 0.0), (0.11, 0.14, 0.0), 232.0),  # aorta, left of midline
    9: ("tube", (0.20, -0.42, 0.0), (0.11, 0.14, 0.0), 210.0),  # postcava (IVC), right
    6: ("ellipsoid", (0.40, 0.05, 0.40), (0.45, 0.55, 0.45), 78.0),  # liver, right upper
    1: ("ellipsoid", (-0.62, -0.20, 0.40), (0.18, 0.24, 0.30), 144.0),  # spleen, left upper
    2: ("ellipsoid", (0.42, -0.42, -0.20), (0.15, 0.20, 0.32), 188.0),  # right kidney, lower
    3: ("ellipsoid", (-0.42, -0.42, -0.10), (0.15, 0.20, 0.32), 188.0),  # left kidney
    12: ("ellipsoid", (0.28, -0.40, 0.42), (0.12, 0.14, 0.14), 100.0),  # right adrenal, above the kidney
    13: ("ellipsoid", (-0.30, -0.40, 0.48), (0.12, 0.14, 0.14), 100.0),  # left adrenal
    7: ("ellipsoid", (-0.35, 0.32, 0.42), (0.24, 0.24, 0.26), 12.0),  # stomach
    4: ("ellipsoid", (0.32, 0.52, 0.02), (0.12, 0.15, 0.16), -10.0),  # gall bladder, under the liver
    11: ("ellipsoid", (-0.10, 0.02, 0.02), (0.38, 0.15, 0.14), 122.0),  # pancreas
    10: ("ellipsoid", (-0.10, -0.16, 0.30), (0.34, 0.11, 0.11), 166.0),  # splenic / portal vein, above it
    14: ("ellipsoid", (0.36, 0.14, -0.28), (0.12, 0.15, 0.22), 34.0),  # duodenum
    5: ("tube", (-0.02, -0.18, 0.0), (0.10, 0.11, 0.0), 56.0),  # esophagus (upper part only)
}
ESOPHAGUS_FROM_W = 0.45  # the esophagus tube is drawn above this height only
NOISE_HU = 10.0
SPINE = ((0.0, -0.72), (0.15, 0.13))  # vertebral body centre and radii (u, v)
DEMO_VERSION = 2  # bumped when the rendering changes, so cached demos are made again (2: the ORGANS above)
TUMOUR_HU = {26: 70.0, 27: 25.0, 28: 20.0, 32: 5.0}
TUMOUR_HOST = {26: 2, 27: 6, 28: 11, 32: 3}  # organ a lesion is drawn in (cyst: the left kidney)


def labelled_classes() -> tuple[int, ...]:
    """The class ids some demo dataset labels (sorted); the other classes are never supervised on the demo."""
    return tuple(sorted({c for *_, classes, _, _ in DATASETS for c in classes}))


def _affine(axcodes: str, spacing: tuple[float, float, float], shape: tuple[int, int, int],
            rng: np.random.Generator) -> np.ndarray:
    """A voxel->RAS affine whose voxel axes point along `axcodes`, centred near the world origin."""
    ornt = nib.orientations.axcodes2ornt(axcodes)
    linear = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        linear[int(world_axis), voxel_axis] = flip * spacing[voxel_axis]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2.0) + rng.uniform(-20, 20, 3).round(2)
    return affine


def _body_coordinates(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Normalised patient coordinates (u, v, w) of every voxel centre (body half-axes = 1)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    extent = np.abs(affine[:3, :3]) @ np.asarray(shape, dtype=np.float64)  # field of view per world axis
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    half = extent * np.array([0.46, 0.36, 0.5])  # body: 92% of the width, 72% of the depth, full height
    return tuple(((world[a] - centre[a]) / half[a]).reshape(shape) for a in range(3))


def _inside(uvw: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    """Inside an ellipsoid; a zero radius leaves that axis unbounded (a tube)."""
    terms = [((x - c) / r) ** 2 for x, c, r in zip(uvw, centre, radii) if r > 0]
    return sum(terms) <= 1.0


def render_case(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int],
                tumours: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume int16, full class-id label uint8) of one synthetic patient."""
    u, v, w = _body_coordinates(affine, shape)
    hu = np.full(shape, AIR_HU)
    label = np.zeros(shape, dtype=np.uint8)
    body = u ** 2 + v ** 2 <= 1.0
    hu[body] = FAT_HU
    hu[u ** 2 / 0.92 ** 2 + v ** 2 / 0.88 ** 2 <= 1.0] = CAVITY_HU  # abdominal cavity (fat and bowel)
    hu[((u - SPINE[0][0]) / SPINE[1][0]) ** 2 + ((v - SPINE[0][1]) / SPINE[1][1]) ** 2 <= 1.0] = BONE_HU
    for cls, (_, centre, radii, value) in ORGANS.items():
        centre = np.asarray(centre) + rng.normal(0, 0.02, 3)
        radii = np.asarray(radii) * rng.uniform(0.9, 1.1)
        inside = _inside((u, v, w), centre, radii)
        if cls == 5:
            inside &= w > ESOPHAGUS_FROM_W
        hu[inside] = value + rng.normal(0, 5)
        label[inside] = cls
    for lesion in tumours:
        host = np.argwhere(label == TUMOUR_HOST[lesion])
        if len(host) == 0:
            continue
        for _ in range(int(rng.integers(1, 3)) if lesion == 27 else 1):
            seed_voxel = host[rng.integers(len(host))]
            radius_vox = rng.uniform(1.5, 3.0)
            grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij", sparse=True)
            dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, seed_voxel)))
            inside = (dist <= radius_vox) & ((label == TUMOUR_HOST[lesion]) | (label == lesion))
            hu[inside] = TUMOUR_HU[lesion] + rng.normal(0, 5)
            label[inside] = lesion
    hu = ndimage.gaussian_filter(hu, 0.5) + rng.normal(0, NOISE_HU, shape)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label


def make_ct_demo(out_dir: str, *, cases_per_dataset: int = 3, multi_organ_cases: int = 6,
                 shape: tuple[int, int, int] = (48, 48, 32), seed: int = 0) -> str:
    """Write the demo collection (module docstring) at `out_dir`: `multi_organ_cases` cases of the 14-organ
    dataset (01, at least `cases_per_dataset`), `cases_per_dataset` of each other; the last case of every
    dataset goes to val.txt, the others to train.txt. The 14-organ set has more cases (issue #23) because nine of
    its organs are labelled nowhere else: with 2 of 10 training cases, a demo-length run saw them in too few
    crops to learn them. Skips the work when the `.complete` marker holds the same arguments. Returns out_dir."""
    if cases_per_dataset < 1 or min(shape) < 8:
        raise ValueError(f"need cases_per_dataset >= 1 and every shape entry >= 8, got {cases_per_dataset}, {shape}")
    multi_organ_cases = max(multi_organ_cases, cases_per_dataset)
    params = {"cases_per_dataset": cases_per_dataset, "multi_organ_cases": multi_organ_cases, "shape": list(shape),
              "seed": seed, "version": DEMO_VERSION}
    write = functools.partial(_write_ct_demo, params=params, cases_per_dataset=cases_per_dataset,
                              multi_organ_cases=multi_organ_cases, shape=shape, seed=seed)
    return build_demo(out_dir, params, write, ('train.txt',))


def _write_ct_demo(out_dir: str, *, params: dict, cases_per_dataset, multi_organ_cases, shape, seed) -> None:
    """Write the files of `make_ct_demo` into `out_dir` (a fresh temporary directory)."""
    lines = {"train": [], "val": []}
    for d, (folder, image_dir, label_dir, (image_stem, label_stem), classes, axcodes, tumours) in enumerate(DATASETS):
        cases = multi_organ_cases if d == 0 else cases_per_dataset
        for case in range(cases):
            rng = np.random.default_rng([seed, d, case])
            spacing = (round(rng.uniform(2.0, 2.8), 3),) * 2 + (round(rng.uniform(2.5, 3.0), 3),)
            # axis-permuted files store (z, y, x): their voxel axes follow the axcodes' world axes
            ornt = nib.orientations.axcodes2ornt(axcodes)
            voxel_shape = tuple(shape[int(a)] for a, _ in ornt)
            voxel_spacing = tuple(spacing[int(a)] for a, _ in ornt)
            affine = _affine(axcodes, voxel_spacing, voxel_shape, rng)
            hu, full_label = render_case(rng, affine, voxel_shape, tumours)
            label = np.where(np.isin(full_label, classes), full_label, 0).astype(np.uint8)
            number = f"{case + 1:04d}" if image_stem in ("img",) else str(case + 1)
            image_rel = f"{folder}/{image_dir}/{image_stem}{number}.nii.gz"
            label_rel = f"{folder}/{label_dir}/{label_stem}{number}.nii.gz"
            save_nifti(os.path.join(out_dir, image_rel), hu, affine)
            save_nifti(os.path.join(out_dir, label_rel), label, affine)
            lines["val" if case == cases - 1 and cases > 1 else "train"].append(
                f"{image_rel}\t{label_rel}")
    for split, rows in lines.items():
        with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(row + "\n" for row in rows))
