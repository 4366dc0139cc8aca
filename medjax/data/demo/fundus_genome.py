"""Synthetic fundus + genotype demo data in the real file formats (MRM, Yang et al., ICCV 2023).

`make_fundus_genome_demo(out_dir)` writes, in the `medjax.data.readers.fundus_genome` layout:
- `out_dir/`: a pretraining set (the UK Biobank stand-in): both eyes of every participant as PNG
  fundus pictures, PLINK `genotypes.bed/.bim/.fam`, and a manifest with a `label` (DR grade 0..4)
  and a `split` column (80/10/10 by participant);
- `out_dir/aptos/`: a downstream APTOS-2019-like set: ~1.25 images per pretraining participant,
  grades 0..4 in APTOS's class proportions, no genotypes and no split column (the dataset then
  applies the authors' 60/20/20 seed-42 split);
- `out_dir/demo_truth.json`: the causal SNPs and their effect signs, for checking a model.

A latent per-participant grade g drives both modalities. Images: an orange-red disc on black with
vignetting and random illumination, a bright optic disc on the nasal side (image right for a right
eye, left for a left eye), a darker macula, dark branching vessels arching from the optic disc, and
lesions (yellow exudates, red dots/haemorrhages, new vessels at g = 4) whose number and size grow
with g. Genotypes: 5% causal SNPs whose A1 frequency moves by EFFECT_PER_GRADE * (g - 2), the rest
random with MAF ~ U(0.05, 0.5); 1% of calls are missing. Everything is deterministic given `seed`.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medjax.data.demo import build_demo
from medjax.data.readers.plink import MISSING, write_plink

NUM_GRADES = 5
EXUDATES_PER_GRADE = (0, 2, 6, 12, 20)  # mean lesion counts (Poisson) per DR grade
RED_DOTS_PER_GRADE = (0, 4, 10, 18, 28)
APTOS_GRADE_COUNTS = (1805, 370, 999, 193, 295)  # APTOS 2019 train.csv, grades 0..4
APTOS_GRADE_FRACTIONS = tuple(c / sum(APTOS_GRADE_COUNTS) for c in APTOS_GRADE_COUNTS)
CAUSAL_FRACTION = 0.05
EFFECT_PER_GRADE = 0.12
MISSING_RATE = 0.01
APTOS_PER_PARTICIPANT = 1.25
# Lesion radii x2 in the pretraining and APTOS sets: the demo models see the pictures at 64 px, where lesions of
# the unscaled radii (0.6-1.3 px at grade 4) cover ~0.5% of the field and a 12-image (10%) fine-tune stayed at
# chance AUC (issue #23); scaled, grade 4 covers ~8% and the grade shows in the encoder's pooled features.
DEMO_LESION_SCALE = 2.0
_EXUDATE_RGB = np.array((238, 216, 96))
_RED_DOT_RGB = np.array((112, 14, 10))
_DISC_RGB = np.array((250, 228, 170), dtype=np.float32)
DISC_U, DISC_RADIUS = 0.55, 0.14  # the optic disc's centre (canonical right-eye frame) and radius (FOV radii)


def _vessel_segments(rng: np.random.Generator, grade: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Line segments (start, end, relative width) of a vessel tree in the canonical right-eye frame:
    optic disc at u = +0.55, temporal side towards -u; coordinates in units of the disc radius."""
    segments = []

    def grow(start, heading, turn, steps, width, depth):
        point = np.asarray(start, dtype=np.float64)
        for _ in range(steps):
            heading += turn + rng.normal(0.0, 0.12)
            nxt = point + 0.11 * np.array((math.cos(heading), math.sin(heading)))
            if np.hypot(*nxt) > 0.97:
                break
            segments.append((point, nxt, width))
            if depth < 2 and rng.random() < 0.3:
                grow(nxt, heading + rng.choice((-1, 1)) * rng.uniform(0.4, 0.8), turn * 0.5,
                     int(steps * 0.5), width * 0.6, depth + 1)
            point = nxt

    disc = np.array((0.55, rng.uniform(-0.06, 0.06)))
    for side in (-1.0, 1.0):  # superior / inferior arcades, an artery and a vein each
        for offset in (-0.15, 0.15):
            heading = side * (math.pi / 2 + 0.2 + offset)
            grow(disc, heading, side * rng.uniform(0.10, 0.16), 12, 1.0, 0)
        grow(disc, side * rng.uniform(0.3, 0.7), 0.0, 4, 0.6, 1)  # nasal branches
    if grade == NUM_GRADES - 1:  # proliferative DR: tortuous new vessels near the disc
        for _ in range(3):
            point, heading = disc + rng.normal(0, 0.05, 2), rng.uniform(0, 2 * math.pi)
            for _ in range(8):
                heading += rng.normal(0.0, 1.0)
                nxt = point + 0.04 * np.array((math.cos(heading), math.sin(heading)))
                segments.append((point, nxt, 0.35))
                point = nxt
    return segments


def render_fundus(rng: np.random.Generator, grade: int, eye: str, size: int, geometry: dict | None = None,
                  lesion_scale: float = 1.0) -> np.ndarray:
    """A synthetic colour fundus photograph, uint8 (size, size + size // 4, 3), field of view a
    disc of radius ~0.47 size on black (real photographs are wider than tall). `geometry`, a dict, receives
    where things are (cx, cy, radius in pixels, mirror, the optic disc's canonical centre (0.55, disc_v) and
    radius DISC_RADIUS), for drawing masks; the picture is the same with or without it. `lesion_scale`
    multiplies the lesions' radii (the pretraining and APTOS sets use DEMO_LESION_SCALE)."""
    height, width = size, size + size // 4
    radius = 0.47 * size * rng.uniform(0.97, 1.0)
    cx = width / 2 + rng.uniform(-0.02, 0.02) * size
    cy = height / 2 + rng.uniform(-0.02, 0.02) * size
    mirror = 1.0 if eye == "right" else -1.0  # the optic disc is nasal: image right for a right eye
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    u, v = mirror * (xx - cx) / radius, (yy - cy) / radius  # canonical right-eye frame
    r2 = u * u + v * v
    inside = r2 <= 1.0

    tint = np.array((rng.uniform(170, 220), rng.uniform(60, 100), rng.uniform(20, 45)), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    shade = (1.0 - 0.45 * r2) * rng.uniform(0.8, 1.15)
    shade *= 1.0 + rng.uniform(0.0, 0.2) * (u * math.cos(angle) + v * math.sin(angle))
    macula = np.exp(-((u + 0.05) ** 2 + v ** 2) / (2 * 0.12 ** 2))
    shade *= 1.0 - 0.3 * macula
    image = tint * shade[..., None]

    disc_v = rng.uniform(-0.06, 0.06)
    disc_weight = 1.0 / (1.0 + (((u - DISC_U) ** 2 + (v - disc_v) ** 2) / DISC_RADIUS ** 2) ** 4)
    if geometry is not None:
        geometry.update(cx=cx, cy=cy, radius=radius, mirror=mirror, disc_u=DISC_U, disc_v=disc_v,
                        disc_radius=DISC_RADIUS, height=height, width=width)
    image = image * (1 - disc_weight[..., None]) + _DISC_RGB * disc_weight[..., None]

    vessels = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(vessels)
    base_width = max(1.0, 0.022 * size)

    def to_pixel(point):  # canonical frame -> pixel (x, y)
        return cx + mirror * point[0] * radius, cy + point[1] * radius

    for start, end, rel_width in _vessel_segments(rng, grade):
        draw.line((to_pixel(start), to_pixel(end)), fill=255, width=max(1, round(base_width * rel_width)))
    vessel_mask = np.asarray(vessels.filter(ImageFilter.GaussianBlur(max(0.4, size / 256))), np.float32) / 255
    image *= 1.0 - 0.5 * vessel_mask[..., None] * np.array((0.8, 1.0, 1.0), dtype=np.float32)

    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    counts = (rng.poisson(EXUDATES_PER_GRADE[grade]), rng.poisson(RED_DOTS_PER_GRADE[grade]))
    for colour, count, base in ((_EXUDATE_RGB, counts[0], 0.008), (_RED_DOT_RGB, counts[1], 0.006)):
        for _ in range(count):
            rho, phi = 0.85 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            px, py = to_pixel((rho * math.cos(phi), rho * math.sin(phi)))
            rad = max(0.6, lesion_scale * size * (base + 0.003 * grade) * rng.uniform(0.6, 1.4))
            fill = tuple(int(c) for c in np.clip(colour + rng.normal(0, 8, 3), 0, 255))
            draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=fill)
    image = np.asarray(canvas, np.float32) + rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)
    image[~inside] = 0.0
    return np.clip(image, 0, 255).astype(np.uint8)


def simulate_genotypes(rng: np.random.Generator, grades: np.ndarray, num_snps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dosages (n, num_snps) int8 with -1 = missing (copies of A2: what the reader returns, ContIG's
    count_A1=False), the causal SNP indices and effect signs.

    Hardy-Weinberg: dosage ~ Binomial(2, p). Non-causal p = MAF ~ U(0.05, 0.5); causal SNPs
    (CAUSAL_FRACTION of them) start at p ~ U(0.3, 0.5) and move by sign * EFFECT_PER_GRADE * (g - 2).
    """
    n = len(grades)
    freq = np.broadcast_to(rng.uniform(0.05, 0.5, num_snps), (n, num_snps)).copy()
    num_causal = max(1, round(CAUSAL_FRACTION * num_snps))
    causal = np.sort(rng.choice(num_snps, num_causal, replace=False))
    signs = rng.choice((-1, 1), num_causal)
    base = rng.uniform(0.3, 0.5, num_causal)
    freq[:, causal] = np.clip(base + signs * EFFECT_PER_GRADE * (grades[:, None] - 2), 0.01, 0.99)
    dosages = rng.binomial(2, freq).astype(np.int8)
    dosages[rng.random((n, num_snps)) < MISSING_RATE] = MISSING
    return dosages, causal, signs


def _snp_annotation(rng: np.random.Generator, num_snps: int):
    chromosomes = [str(1 + j * 22 // num_snps) for j in range(num_snps)]
    positions = 1000 * np.arange(1, num_snps + 1) + rng.integers(0, 1000, num_snps)  # increasing bp
    bases = np.array(list("ACGT"))
    first = rng.integers(0, 4, num_snps)
    second = (first + rng.integers(1, 4, num_snps)) % 4
    alleles = list(zip(bases[first], bases[second]))
    return chromosomes, positions.tolist(), alleles


def _write_manifest(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _aptos_grades(rng: np.random.Generator, n: int) -> np.ndarray:
    """n grades in APTOS proportions (largest remainder; every grade at least once when n >= 5)."""
    exact = np.array(APTOS_GRADE_FRACTIONS) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    while n >= NUM_GRADES and (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return rng.permutation(np.repeat(np.arange(NUM_GRADES), counts))


def make_fundus_genome_demo(out_dir: str, *, participants: int = 160, image_size: int = 128, num_snps: int = 2000,
                            seed: int = 0) -> str:
    """Write the demo pretraining set at `out_dir` and the APTOS-like set at `out_dir/aptos`.

    Skips the work if `out_dir/manifest.csv` and the `.complete` marker (written last, holding
    these arguments) exist and the arguments match. Returns out_dir.
    """
    if participants < 1 or image_size < 8 or num_snps < 1:
        raise ValueError(f"need participants >= 1, image_size >= 8, num_snps >= 1; got {participants}, "
                         f"{image_size}, {num_snps}")
    params = {"participants": participants, "image_size": image_size, "num_snps": num_snps, "seed": seed,
              "version": 2}  # bumped when the content changes (2: DEMO_LESION_SCALE), so caches are remade
    write = functools.partial(_write_fundus_genome_demo, params=params,
                              participants=participants, image_size=image_size, num_snps=num_snps, seed=seed)
    return build_demo(out_dir, params, write, ('manifest.csv',))


def _write_fundus_genome_demo(out_dir: str, *, params: dict, participants, image_size, num_snps, seed) -> None:
    """Write the files of `make_fundus_genome_demo` into `out_dir` (a fresh temporary directory)."""
    aptos_dir = os.path.join(out_dir, "aptos")
    for d in (os.path.join(out_dir, "images"), os.path.join(aptos_dir, "images")):
        os.makedirs(d, exist_ok=True)

    rng = np.random.default_rng([seed, 0])
    grades = rng.permutation(np.arange(participants) % NUM_GRADES)  # every grade equally often
    ids = [str(1_000_001 + i) for i in range(participants)]
    order = rng.permutation(participants)
    split_of = np.empty(participants, dtype=object)
    n_train, n_val = int(0.8 * participants), int(0.9 * participants)
    split_of[order[:n_train]], split_of[order[n_train:n_val]], split_of[order[n_val:]] = "train", "val", "test"
    rows = []
    for i, pid in enumerate(ids):
        for e, eye in enumerate(("left", "right")):
            rel = f"images/{pid}_{eye}.png"
            image = render_fundus(np.random.default_rng([seed, 1, i, e]), int(grades[i]), eye, image_size,
                                  lesion_scale=DEMO_LESION_SCALE)
            _save_png(image, os.path.join(out_dir, rel))
            rows.append([pid, eye, rel, int(grades[i]), split_of[i]])
    dosages, causal, signs = simulate_genotypes(rng, grades, num_snps)
    chromosomes, positions, alleles = _snp_annotation(rng, num_snps)
    snp_ids = [f"rs{100_000 + 37 * j}" for j in range(num_snps)]
    write_plink(os.path.join(out_dir, "genotypes"), dosages, ids, snp_ids=snp_ids, chromosomes=chromosomes,
                positions=positions, alleles=alleles)
    _write_manifest(os.path.join(out_dir, "manifest.csv"), ["participant_id", "eye", "image_path", "label", "split"], rows)
    with open(os.path.join(out_dir, "demo_truth.json"), "w", encoding="utf-8") as f:
        json.dump({"causal_snp_ids": [snp_ids[j] for j in causal], "effect_signs": signs.tolist(),
                   "effect_per_grade": EFFECT_PER_GRADE, "params": params}, f, indent=1)

    num_aptos = max(1, round(APTOS_PER_PARTICIPANT * participants))
    aptos_rows = []
    for k, grade in enumerate(_aptos_grades(rng, num_aptos)):
        eye = "left" if rng.random() < 0.5 else "right"
        rel = f"images/aptos{k:05d}.png"
        _save_png(render_fundus(np.random.default_rng([seed, 2, k]), int(grade), eye, image_size,
                                lesion_scale=DEMO_LESION_SCALE),
                  os.path.join(aptos_dir, rel))
        aptos_rows.append([f"aptos{k:05d}", eye, rel, int(grade)])
    _write_manifest(os.path.join(aptos_dir, "manifest.csv"), ["participant_id", "eye", "image_path", "label"], aptos_rows)
