"""Synthetic whole-slide images in the real format: tiled pyramidal TIFFs with H&E-like tissue on glass.

`make_wsi_demo(out_dir)` writes
- `out_dir/slides/<slide_id>.tif`: pyramidal TIFFs (levels 1, 4, 16; 256-px tiles; deflate, or JPEG
  with imagecodecs installed), microns per pixel in the resolution tags and an Aperio-style
  description; slide 1 (and 5, 9, ...) is scanned at 40x (0.25 um/px), the others at 20x (0.5 um/px);
- `out_dir/tile_labels.csv`: `slide_id,x,y,label,label_name` for the 256-px tiles at 20x (level-0
  corners; 512 level-0 pixels on a 40x slide) lying for >= 75% in one tissue class, the labels of a
  tile-classification evaluation (kNN / linear probe, UNI Sec. "ROI-level tasks");
- `out_dir/slides.csv`: `slide_id,file,mpp,magnification,label,label_name`, a slide label (tumour
  present) for slide-level (ABMIL) evaluation.

Each slide has two tissue fragments (irregular ellipses) on bright glass. The classes are
`TISSUE_CLASSES`: stroma (pink eosin, sparse small elongated nuclei), tumour (purple-pink cytoplasm,
dense large pleomorphic nuclei; only on tumour slides) and lymphocyte aggregates (dense small dark
round nuclei). The first fragment has a lumen (a glass hole of up to 150 um radius, kept as a hole by
the tissue mask); a few specks of debris lie on the glass (removed by the area filter). Everything is
deterministic given `seed`; structures are laid out in microns, so 20x and 40x slides look alike.
"""
from __future__ import annotations

import csv
import functools
import os

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from medjax.data.demo import build_demo
from medjax.data.readers.wsi_write import write_pyramidal_tiff

TISSUE_CLASSES = ("stroma", "tumor", "lymphocytes")
GLASS = 255  # class-map value of glass
SLIDE_LABELS = ("normal", "tumor")
DOWNSAMPLES = (1, 4, 16)
TILE_LABEL_PURITY = 0.75
_GLASS_RGB = (242, 242, 240)
_BASE_RGB = np.array([(229, 160, 196), (208, 146, 194), (222, 168, 206)], np.float32)
# Per class: nuclei per 1000 um^2, radius range (um), elongation range, colour.
_NUCLEI = (
    (1.2, (1.5, 2.5), (1.5, 3.0), (118, 74, 152)),
    (7.0, (3.0, 5.0), (1.0, 1.5), (96, 56, 148)),
    (14.0, (1.8, 2.4), (1.0, 1.15), (58, 32, 104)),
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Gaussian-filtered white noise of `shape`, unit standard deviation, bilinearly resized to
    `size` = (width, height) when given (a smooth field at any resolution)."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    field = (field / max(field.std(), 1e-6)).astype(np.float32)
    if size is None:
        return field
    return np.asarray(Image.fromarray(field, "F").resize(size, Image.Resampling.BILINEAR))


def _class_map(rng: np.random.Generator, shape: tuple[int, int], cell_um: float, tumor: bool) -> np.ndarray:
    """Class map on a grid of `cell_um` cells: two fragments with sub-regions, a lumen, debris specks;
    GLASS elsewhere. Noise fields are drawn on a 16-um grid and interpolated (smooth boundaries)."""
    h, w = shape
    grid = (max(4, int(h * cell_um / 16)), max(4, int(w * cell_um / 16)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    classes = np.full(shape, GLASS, np.uint8)
    boundary = _smooth_noise(rng, grid, 2.0, (w, h))
    lymph = _smooth_noise(rng, grid, 10.0, (w, h))
    nests = _smooth_noise(rng, grid, 10.0, (w, h))
    for k, (cx, cy) in enumerate([(0.29 * w, 0.5 * h), (0.72 * w, 0.5 * h)]):
        cx, cy = cx + rng.uniform(-0.03, 0.03) * w, cy + rng.uniform(-0.08, 0.08) * h
        ax, ay = rng.uniform(0.18, 0.22) * w, rng.uniform(0.3, 0.38) * h
        angle = rng.uniform(-0.3, 0.3)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / ax
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ay
        inside = u ** 2 + v ** 2 + 0.15 * boundary < 1.0
        # Lymphocyte aggregates on ~20% of a fragment, tumour nests on ~40% of the rest (quantiles of the
        # fields inside the fragment, so that every fragment, however small, has them).
        lymphoid = lymph > np.quantile(lymph[inside], 0.8)
        region = np.where(lymphoid, 2, 0).astype(np.uint8)
        if tumor and (k == 0 or rng.random() < 0.5):
            region[(nests > np.quantile(nests[inside], 0.6)) & ~lymphoid] = 1
        classes[inside] = region[inside]
        if k == 0:  # a lumen: a glass hole of radius 150 um (at most a third of the fragment's) in the first fragment
            radius = min(150 / cell_um, min(ax, ay) / 3)
            classes[(xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2] = GLASS
    for _ in range(3):  # debris: stained specks of ~10 um on the glass, above the tissue
        x, y = int(rng.uniform(0.02, 0.98) * w), int(rng.uniform(0.02, 0.08) * h)
        size = max(1, int(round(10 / cell_um)))
        classes[y:y + size, x:x + size] = 2
    return classes


def class_step(mpp: float) -> int:
    """Level-0 pixels per class-map pixel: about 2 um (4 at 20x, 8 at 40x)."""
    return max(1, int(round(2.0 / mpp)))


def render_slide(rng: np.random.Generator, width: int, height: int, mpp: float, tumor: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (height, width, 3), class map uint8 (ceil(height / s), ceil(width / s)) with
    s = class_step(mpp): the class index, or GLASS, of each s x s block of pixels)."""
    step = class_step(mpp)
    small = (-(-width // step), -(-height // step))
    classes = _class_map(rng, (small[1], small[0]), step * mpp, tumor)
    palette = np.zeros((256, 3), np.float32)
    palette[GLASS] = _GLASS_RGB
    palette[:len(TISSUE_CLASSES)] = _BASE_RGB
    # Stain texture on the class grid: broad shading plus horizontal collagen-like streaks.
    shade = _smooth_noise(rng, (12, 12), 1.5, small) + 0.8 * _smooth_noise(rng, (small[1], small[0]), (0.7, 4.0))
    base = palette[classes] + np.where(classes != GLASS, 7.0 * shade, 0.0)[..., None]
    base = np.clip(np.round(base), 2, 253).astype(np.uint8)
    base = np.repeat(np.repeat(base, step, axis=0)[:height], step, axis=1)[:, :width]
    image = Image.fromarray(np.ascontiguousarray(base))
    draw = ImageDraw.Draw(image)
    area_um2 = width * height * mpp * mpp
    for label, (density, radius_um, elongation, colour) in enumerate(_NUCLEI):
        count = rng.poisson(density * area_um2 / 1000.0)
        xs, ys = rng.uniform(0, width, count), rng.uniform(0, height, count)
        keep = classes[(ys // step).astype(int), (xs // step).astype(int)] == label
        xs, ys = xs[keep], ys[keep]
        radii = rng.uniform(*radius_um, xs.size) / mpp
        stretch = rng.uniform(*elongation, xs.size)
        horizontal = rng.random(xs.size) < 0.7
        rx = np.where(horizontal, radii * stretch, radii / np.sqrt(stretch))
        ry = np.where(horizontal, radii / np.sqrt(stretch), radii * stretch)
        for x, y, a, b in zip(xs, ys, rx, ry):
            draw.ellipse((x - a, y - b, x + a, y + b), fill=colour)
    pixels = np.array(image)  # every value in [2, 253]: the +-2 noise below cannot wrap around
    pixels += rng.integers(0, 5, size=pixels.shape, dtype=np.uint8)
    pixels -= 2
    return pixels, classes


def tile_labels(classes: np.ndarray, tile: int, step: int = 1, purity: float = TILE_LABEL_PURITY
                ) -> list[tuple[int, int, int]]:
    """(x, y, label) in level-0 pixels of the `tile`-pixel grid tiles that are >= `purity` one tissue class;
    `classes` has one entry per `step` x `step` level-0 pixels (`tile` a multiple of `step`)."""
    size = tile // step
    rows, cols = classes.shape[0] // size, classes.shape[1] // size
    blocks = classes[:rows * size, :cols * size].reshape(rows, size, cols, size)
    labelled = []
    for label in range(len(TISSUE_CLASSES)):
        fraction = (blocks == label).mean(axis=(1, 3))
        for r, c in zip(*np.nonzero(fraction >= purity)):
            labelled.append((int(c * tile), int(r * tile), label))
    return sorted(labelled, key=lambda item: (item[1], item[0]))


def make_wsi_demo(out_dir: str, *, num_slides: int = 4, size: int = 3072, seed: int = 0,
                  compression: str = "zlib") -> str:
    """Write the demo (module doc) and return `out_dir`; `size` is a slide's width at 20x in pixels.

    Skips the work when the `.complete` marker (written last, holding these arguments) matches.
    """
    if num_slides < 1 or size < 512:
        raise ValueError(f"make_wsi_demo: need num_slides >= 1 and size >= 512, got {num_slides}, {size}")
    params = {"num_slides": num_slides, "size": size, "seed": seed, "compression": compression}
    write = functools.partial(_write_wsi_demo, params=params,
                              num_slides=num_slides, size=size, seed=seed, compression=compression)
    return build_demo(out_dir, params, write)


def _write_wsi_demo(out_dir: str, *, params: dict, num_slides, size, seed, compression) -> None:
    """Write the files of `make_wsi_demo` into `out_dir` (a fresh temporary directory)."""
    os.makedirs(os.path.join(out_dir, "slides"), exist_ok=True)
    slide_rows, label_rows = [], []
    for index in range(num_slides):
        rng = np.random.default_rng([seed, index])
        scale = 2 if index % 4 == 1 else 1  # 20x, 40x, 20x, 20x, ...
        mpp = 0.5 / scale
        width = size * scale
        height = int(round(size * rng.uniform(0.7, 0.8) / 256)) * 256 * scale
        tumor = index % 4 in (0, 3)
        image, classes = render_slide(rng, width, height, mpp, tumor)
        name = f"demo_{index:03d}"
        write_pyramidal_tiff(os.path.join(out_dir, "slides", f"{name}.tif"), image, mpp=mpp,
                             downsamples=DOWNSAMPLES, compression=compression, compression_level=1,
                             description=f"medjax demo WSI {width}x{height} |AppMag = {20 * scale} |MPP = {mpp}")
        label_rows += [(name, x, y, label, TISSUE_CLASSES[label])
                       for x, y, label in tile_labels(classes, 256 * scale, class_step(mpp))]
        has_tumor = bool((classes == 1).any())
        slide_rows.append((name, f"slides/{name}.tif", mpp, 20 * scale, int(has_tumor), SLIDE_LABELS[has_tumor]))
    _write_csv(os.path.join(out_dir, "tile_labels.csv"), ("slide_id", "x", "y", "label", "label_name"), label_rows)
    _write_csv(os.path.join(out_dir, "slides.csv"), ("slide_id", "file", "mpp", "magnification", "label", "label_name"),
               slide_rows)


def _write_csv(path: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
