"""Synthetic downstream sets of MRM's transfer table (Yang et al., ICCV 2023, Tab. 1) in the released layouts.

`make_fundus_transfer_demo(out_dir)` writes
- `out_dir/rfmid/`: RFMiD (medjax.data.readers.rfmid): Training_Set/Training_Set/RFMiD_Training_Labels.csv with
  Training/<ID>.png, and likewise Evaluation_Set (Validation/) and Test_Set (Test/); the CSVs carry ID and the 46
  label columns (Disease_Risk + 45 conditions). Seven conditions are drawn into the picture (`RENDERED`): DR
  (exudates and red dots of a DR grade 1..4, medjax.data.demo.fundus_genome.render_fundus), MH (media haze: a
  blur and a grey veil), TSLN (tessellation: dark stripes), LS (laser scars: a ring of pale spots), ARMD (yellow
  drusen at the macula), ODC (a swollen optic disc with a large white cup), MYA (a pale peripapillary crescent);
  the other conditions are labels at low prevalence with nothing in the image (an input-blind AUC, 0.5, is their
  ceiling: experiments/mrm_rfmid.py's demo and tiny variants score only the drawn seven).
  Disease_Risk = any condition.
- `out_dir/palm/`: PALM (medjax.data.readers.palm): PALM-Training400/<ID>.jpg for H (high myopia), N (normal) and
  P (pathologic myopia) images in PALM-400's proportions (at least 5 H, for the stratified split), Disc_Masks/<ID>.bmp
  for every image and Lesion_Masks/Atrophy/<ID>.bmp for the images with atrophy (every P, half the H), masks black
  (0) on the structure and white elsewhere, as released. The atrophy is a pale crescent beside the disc.

Everything is deterministic given `seed`; the maker skips the work when a finished demo of the same arguments is
there (medjax.data.demo.build_demo).
"""
from __future__ import annotations

import csv
import functools
import math
import os

import numpy as np
from PIL import Image, ImageFilter

from medjax.data.demo import build_demo
from medjax.data.demo.fundus_genome import render_fundus
from medjax.data.readers.palm import ATROPHY_DIR, DISC_DIR, IMAGE_DIR
from medjax.data.readers.rfmid import RFMID_LABELS, SPLITS

RENDERED = ("DR", "MH", "TSLN", "LS", "ARMD", "ODC", "MYA")
RENDERED_PREVALENCE = 0.25  # each rendered condition, independently
OTHER_PREVALENCE = 0.04  # each condition that is only a label
DEMO_VERSION = 2  # 2: ARMD drusen, laser scars and the ODC cup drawn larger (visible at the demo's 64 px)
PALM_FRACTIONS = {"P": 213 / 400, "H": 26 / 400, "N": 161 / 400}  # PALM-Training400's classes


def _canonical(geometry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) canonical right-eye coordinates of every pixel (render_fundus's frame)."""
    yy, xx = np.mgrid[:geometry["height"], :geometry["width"]].astype(np.float32)
    u = geometry["mirror"] * (xx - geometry["cx"]) / geometry["radius"]
    return u, (yy - geometry["cy"]) / geometry["radius"]


def _blend(image: np.ndarray, weight: np.ndarray, colour) -> np.ndarray:
    w = np.clip(weight, 0.0, 1.0)[..., None]
    return image * (1 - w) + np.asarray(colour, np.float32) * w


def _crescent(geometry: dict, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a peripapillary atrophy crescent: an ellipse around the optic disc, shifted temporally,
    the disc itself excluded."""
    u, v = _canonical(geometry)
    du, dv, r = u - geometry["disc_u"], v - geometry["disc_v"], geometry["disc_radius"]
    a, b = r * rng.uniform(1.5, 2.3), r * rng.uniform(1.2, 1.8)
    shift = r * rng.uniform(0.3, 0.8)
    ellipse = ((du + shift) / a) ** 2 + (dv / b) ** 2 <= 1.0
    return ellipse & ~(du ** 2 + dv ** 2 <= r ** 2)


def _disc_mask(geometry: dict) -> np.ndarray:
    u, v = _canonical(geometry)
    return (u - geometry["disc_u"]) ** 2 + (v - geometry["disc_v"]) ** 2 <= geometry["disc_radius"] ** 2


def _draw_conditions(image: np.ndarray, conditions: set[str], geometry: dict, rng: np.random.Generator) -> np.ndarray:
    """Paint the rendered RFMiD conditions (except DR, drawn by render_fundus) on a fundus picture."""
    out = image.astype(np.float32)
    inside = np.any(image > 0, axis=-1)
    u, v = _canonical(geometry)
    if "TSLN" in conditions:  # tessellation: choroidal vessels as dark stripes
        phase = rng.uniform(0, 2 * math.pi)
        stripes = 0.5 + 0.5 * np.sin(18.0 * (u * 0.8 + v * 0.6) + phase)
        out *= 1.0 - 0.25 * stripes[..., None]
    if "ARMD" in conditions:  # drusen: yellow dots around the macula
        for _ in range(rng.integers(8, 16)):
            cu, cv = rng.normal(-0.05, 0.12), rng.normal(0.0, 0.12)
            out = _blend(out, np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * 0.04 ** 2)) * 0.9, (235, 220, 120))
    if "LS" in conditions:  # laser scars: pale spots with dark rims on a ring
        for k in range(12):
            angle = 2 * math.pi * k / 12 + rng.uniform(-0.1, 0.1)
            cu, cv = 0.6 * math.cos(angle) - 0.05, 0.6 * math.sin(angle)
            d2 = (u - cu) ** 2 + (v - cv) ** 2
            out = _blend(out, np.exp(-d2 / (2 * 0.06 ** 2)), (60, 35, 20))
            out = _blend(out, np.exp(-d2 / (2 * 0.035 ** 2)), (240, 225, 190))
    if "ODC" in conditions:  # cupping: a large white cup filling a swollen disc, a thin dark-pink rim around it
        d2 = (u - geometry["disc_u"]) ** 2 + (v - geometry["disc_v"]) ** 2
        out = _blend(out, (d2 <= (1.5 * geometry["disc_radius"]) ** 2) * 0.9, (200, 90, 80))
        out = _blend(out, (d2 <= (1.2 * geometry["disc_radius"]) ** 2) * 1.0, (255, 255, 250))
    if "MYA" in conditions:  # myopic crescent
        out = _blend(out, _crescent(geometry, rng) * 0.7, (240, 215, 170))
    if "MH" in conditions:  # media haze: blur and a grey veil
        blurred = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(max(1.0, out.shape[0] / 40)))
        out = np.asarray(blurred, np.float32) * 0.7 + 50.0
    out[~inside] = 0.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _rfmid_split(directory: str, split: str, count: int, image_size: int, seed: int) -> None:
    folder, labels_file, image_folder = SPLITS[split]
    base = os.path.join(directory, folder, folder)
    os.makedirs(os.path.join(base, image_folder), exist_ok=True)
    rng = np.random.default_rng([seed, 10, list(SPLITS).index(split)])
    rows = []
    for k in range(count):
        image_id = k + 1  # each released split numbers its images from 1
        conditions = {c for c in RENDERED if rng.random() < RENDERED_PREVALENCE}
        conditions |= {c for c in RFMID_LABELS[1:] if c not in RENDERED and rng.random() < OTHER_PREVALENCE}
        grade = int(rng.integers(1, 5)) if "DR" in conditions else 0
        eye = "left" if rng.random() < 0.5 else "right"
        geometry: dict = {}
        picture_rng = np.random.default_rng([seed, 11, list(SPLITS).index(split), k])
        image = render_fundus(picture_rng, grade, eye, image_size, geometry)
        image = _draw_conditions(image, conditions, geometry, picture_rng)
        Image.fromarray(image).save(os.path.join(base, image_folder, f"{image_id}.png"), compress_level=1)
        flags = {c: int(c in conditions) for c in RFMID_LABELS[1:]}
        flags["Disease_Risk"] = int(bool(conditions))
        rows.append([image_id] + [flags[c] for c in RFMID_LABELS])
    with open(os.path.join(base, labels_file), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", *RFMID_LABELS])
        writer.writerows(rows)


def _palm_counts(n: int) -> dict[str, int]:
    h = max(5, round(PALM_FRACTIONS["H"] * n))
    p = round(PALM_FRACTIONS["P"] * n)
    return {"P": p, "H": h, "N": max(0, n - p - h)}


def _palm(directory: str, count: int, image_size: int, seed: int) -> None:
    for sub in (IMAGE_DIR, DISC_DIR, ATROPHY_DIR):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    rng = np.random.default_rng([seed, 20])
    for cls, n in _palm_counts(count).items():
        for k in range(n):
            image_id = f"{cls}{k + 1:04d}"
            geometry: dict = {}
            picture_rng = np.random.default_rng([seed, 21, ord(cls), k])
            eye = "left" if rng.random() < 0.5 else "right"
            image = render_fundus(picture_rng, 0, eye, image_size, geometry).astype(np.float32)
            inside = np.any(image > 0, axis=-1)
            atrophy = None
            if cls == "P" or (cls == "H" and rng.random() < 0.5):
                atrophy = _crescent(geometry, picture_rng) & inside
                image = _blend(image, atrophy * 0.75, (235, 210, 165))
            image = np.clip(image + picture_rng.normal(0, 2.0, image.shape), 0, 255).astype(np.uint8)
            image[~inside] = 0
            Image.fromarray(image).save(os.path.join(directory, IMAGE_DIR, f"{image_id}.jpg"), quality=95)
            black_on = lambda m: Image.fromarray(np.where(m, 0, 255).astype(np.uint8))  # noqa: E731
            black_on(_disc_mask(geometry)).save(os.path.join(directory, DISC_DIR, f"{image_id}.bmp"))
            if atrophy is not None:
                black_on(atrophy).save(os.path.join(directory, ATROPHY_DIR, f"{image_id}.bmp"))


def make_fundus_transfer_demo(out_dir: str, *, rfmid_images: tuple[int, int, int] = (192, 64, 64),
                              palm_images: int = 100, image_size: int = 128, seed: int = 0) -> str:
    """Write the RFMiD-like set at `out_dir/rfmid` (train, val, test image counts) and the PALM-like set at
    `out_dir/palm`; returns out_dir."""
    if min(rfmid_images) < 1 or palm_images < 15 or image_size < 16:
        raise ValueError(f"need >= 1 RFMiD image per split, >= 15 PALM images (5 of them H, for the stratified "
                         f"split) and image_size >= 16; got {rfmid_images}, {palm_images}, {image_size}")
    params = {"rfmid_images": list(rfmid_images), "palm_images": palm_images, "image_size": image_size, "seed": seed,
              "version": DEMO_VERSION}
    write = functools.partial(_write, rfmid_images=tuple(rfmid_images), palm_images=palm_images,
                              image_size=image_size, seed=seed)
    return build_demo(out_dir, params, write, ("rfmid/Training_Set/Training_Set/RFMiD_Training_Labels.csv",))


def _write(out_dir: str, *, rfmid_images, palm_images, image_size, seed) -> None:
    for split, count in zip(SPLITS, rfmid_images):
        _rfmid_split(os.path.join(out_dir, "rfmid"), split, count, image_size, seed)
    _palm(os.path.join(out_dir, "palm"), palm_images, image_size, seed)
