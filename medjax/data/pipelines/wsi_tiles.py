"""A Grain random-access source of whole-slide-image tiles, and DINOv2's multi-crop augmentation.

    source = WSITileSource.from_coords_dir("slides/", "coords/")       # `python -m medjax.data tile` output
    ds = grain.MapDataset.source(source).shuffle(seed=0).map(...)       # or medjax.data.pipelines.global_batches
    crops = DinoMultiCrop()(source[0], np.random.default_rng([seed, position]))

`WSITileSource[i]` -> {"image": uint8 (tile, tile, 3), "slide": int32, "coords": int64 (2,) level-0
(x, y)[, "label": int32]}. Its state is slide paths and numpy arrays only: slides are opened lazily,
by each thread of each worker process for itself (a bounded LRU of open slides per thread), so the
source pickles into Grain worker processes without open file handles and threads never share one.

`DinoMultiCrop` is DINOv2's `DataAugmentationDINO` (Oquab et al., TMLR 2024; `dinov2/data/augmentations.py`,
the recipe of UNI, Chen et al., Nat. Med. 2024): 2 global crops of 224 (RandomResizedCrop scale
0.32-1.0, bicubic) and 8 local crops of 96 (scale 0.05-0.32), each flipped with p 0.5, colour
jittered (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; p 0.8), grayscaled (p 0.2), blurred
(9-tap Gaussian, sigma 0.1-2.0) and, on the second global crop, solarized (threshold 128, p 0.2), then
ImageNet-normalised. Blur probabilities: DINOv2's `GaussianBlur(p)` passes 1 - p to RandomApply, so
its code blurs global crop 1 never, global crop 2 with p 0.9 and local crops with p 0.5
(`DINOV2_CODE_BLUR_PROBS`); the default here is the intended BYOL / DINO recipe, (1.0, 0.1, 0.5).
Colour operations follow torchvision's tensor implementation on float images in [0, 1] (DINOv2 runs
them on 8-bit PIL images, which rounds after each step). Every random choice comes from the
`np.random.Generator` passed per element, so a pipeline seeded by (seed, position) is reproducible
on any number of workers.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from medjax.data.transforms.image import IMAGENET_MEAN, IMAGENET_STD
from medjax.data.readers.text_io import open_text
from medjax.data.tiling.coords import integer_coords, read_coords, tile_geometry
from medjax.data.readers.wsi import SLIDE_EXTENSIONS, open_slide
from medjax.errors import MedjaxInputError

Example = dict[str, Any]
DINOV2_CODE_BLUR_PROBS = (0.0, 0.9, 0.5)
_GRAY_WEIGHTS = np.array((0.2989, 0.587, 0.114), np.float32)  # torchvision rgb_to_grayscale


class TileCoordsError(MedjaxInputError):
    """A tile corner that is not a pixel of its slide; the message names the coordinates file and row."""


class WSITileSource:
    """Random access to tiles (slide, x, y): reads `patch_size[s]` pixels at `patch_level[s]` of slide s
    from level-0 (x, y) and resizes to `tile_size` (PIL bilinear, antialiased).

    Every tile is checked when the source is built (each slide is opened once for its dimensions):
    its corner must be finite integers with 0 <= x < width and 0 <= y < height of level 0, and the
    region read at `patch_level` must lie inside that level, up to 1 pixel of rounding (x_l + size <=
    width_l + 1, x_l = floor(x * width_l / width_0), the same for y) - a tile outside would be read as
    white glass and trained on; `allow_edge_tiles` accepts such edge tiles (CLAM's `use_padding=True` keeps them,
    the part past the edge read as white). `describe_tile(i)` names tile i in the `TileCoordsError` (the
    constructors below give "<slide_id>.h5: row r" / "labels.csv: line n"; by default the slide and the
    tile's row among that slide's tiles).
    """

    def __init__(self, slide_paths: Sequence[str], slide_index: np.ndarray, coords: np.ndarray,
                 patch_level: Sequence[int], patch_size: Sequence[int], *, tile_size: int = 256,
                 labels: np.ndarray | None = None, max_open_slides: int = 8, backend: str = "auto",
                 describe_tile: Callable[[int], str] | None = None, allow_edge_tiles: bool | None = False):
        self.slide_paths = [str(p) for p in slide_paths]
        self.slide_index = np.asarray(slide_index, np.int32)
        describe = describe_tile or self._default_description
        self.coords = integer_coords(np.asarray(coords).reshape(-1, 2), describe)
        self.patch_level = np.asarray(patch_level, np.int32)
        self.patch_size = np.asarray(patch_size, np.int32)
        self.tile_size = int(tile_size)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.max_open_slides = int(max_open_slides)
        self.backend = backend
        self.allow_edge_tiles = bool(allow_edge_tiles)
        n = len(self.slide_paths)
        n_tiles = len(self.coords)
        if len(self.slide_index) != n_tiles or (self.labels is not None and len(self.labels) != n_tiles):
            raise ValueError(f"WSITileSource: slide_index ({len(self.slide_index)}), coords ({len(self.coords)}) and "
                             f"labels must have one entry per tile")
        if self.patch_level.shape != (n,) or self.patch_size.shape != (n,):
            raise ValueError(f"WSITileSource: patch_level and patch_size need one entry per slide ({n})")
        if len(self.slide_index) and (self.slide_index.min() < 0 or self.slide_index.max() >= n):
            raise ValueError(f"WSITileSource: slide_index must lie in [0, {n})")
        self._local = threading.local()
        self._check_bounds(describe)

    def _default_description(self, index: int) -> str:
        s = int(self.slide_index[index])
        row = int(np.count_nonzero(self.slide_index[:index] == s))
        return f"{self.slide_paths[s]}: tile {index} (row {row} of this slide's coordinates)"

    def _check_bounds(self, describe: Callable[[int], str]) -> None:
        """Every tile inside its slide (class docstring); TileCoordsError naming the first bad row."""
        for s, path in enumerate(self.slide_paths):
            rows = np.flatnonzero(self.slide_index == s)
            if not rows.size:
                continue
            with open_slide(path, self.backend) as slide:
                dims = slide.level_dimensions
            level, size = int(self.patch_level[s]), int(self.patch_size[s])
            if not 0 <= level < len(dims):
                raise TileCoordsError(f"{describe(int(rows[0]))}: patch_level {level}, but slide {path} has levels "
                                      f"0..{len(dims) - 1}")
            (w0, h0), (wl, hl) = dims[0], dims[level]
            x, y = self.coords[rows, 0], self.coords[rows, 1]
            inside = (x >= 0) & (y >= 0) & (x < w0) & (y < h0)
            fits = (x * wl // w0 + size <= wl + 1) & (y * hl // h0 + size <= hl + 1)
            if self.allow_edge_tiles:  # CLAM's use_padding: edge tiles read past the slide as white glass
                fits = np.ones_like(fits)
            bad = np.flatnonzero(~(inside & fits))
            if bad.size:
                i = int(rows[bad[0]])
                what = "outside the slide" if not inside[bad[0]] else "reaching past the slide's edge"
                raise TileCoordsError(
                    f"{describe(i)}: tile corner (x, y) = {self.coords[i].tolist()} is {what}: slide {path} level 0 is "
                    f"{w0}x{h0} and a tile reads {size}x{size} pixels at level {level} ({wl}x{hl}); "
                    f"{bad.size} of this slide's {rows.size} tiles are bad (they would read white glass)")

    # -- construction from files --------------------------------------------------------------------
    @classmethod
    def from_coords_dir(cls, slides_dir: str, coords_dir: str, *, tile_size: int = 256, **kwargs) -> "WSITileSource":
        """Every `<coords_dir>/<slide_id>.h5` (CLAM layout) with its slide `<slides_dir>/<slide_id>.<ext>`. Tiles
        crossing the slide's edge are accepted when every file records `use_padding` = 1 (`python -m medjax.data
        tile` writes it: CLAM's use_padding=True) or `allow_edge_tiles=True` is passed; else refused."""
        files = sorted(name for name in os.listdir(coords_dir) if name.endswith(".h5"))
        if not files:
            raise ValueError(f"{coords_dir}: no <slide_id>.h5 coordinate files")
        paths, indices, coords, levels, sizes, h5_paths, padded = [], [], [], [], [], [], []
        for name in files:
            h5_path = os.path.join(coords_dir, name)
            xy, attrs = read_coords(h5_path)
            h5_paths.append(h5_path)
            paths.append(_find_slide(slides_dir, name[:-3], h5_path))
            indices.append(np.full(len(xy), len(paths) - 1, np.int32))
            coords.append(xy)
            levels.append(int(attrs["patch_level"]))
            sizes.append(int(attrs["patch_size"]))
            padded.append(attrs.get("use_padding", 0))
        if kwargs.get("allow_edge_tiles") is None:
            kwargs["allow_edge_tiles"] = all(bool(flag) for flag in padded)
        index = np.concatenate(indices)
        starts = np.cumsum([0] + [len(c) for c in coords])

        def describe(i: int) -> str:
            return f"{h5_paths[index[i]]}: row {i - starts[index[i]]} of dataset 'coords'"

        return cls(paths, index, np.concatenate(coords), levels, sizes, tile_size=tile_size,
                   describe_tile=describe, **kwargs)

    @classmethod
    def from_labels_csv(cls, csv_path: str, slides_dir: str, *, patch_size: int = 256, magnification: float = 20.0,
                        default_mpp: float | None = None, **kwargs) -> "WSITileSource":
        """Labelled tiles from a CSV `slide_id,x,y,label` (level-0 corners of `patch_size` tiles at
        `magnification`, e.g. the demo's `tile_labels.csv`); each slide's read geometry from its mpp."""
        rows = _read_label_rows(csv_path)
        slide_ids = sorted({row[0] for row in rows})
        paths, levels, sizes = [], [], []
        for sid in slide_ids:
            paths.append(_find_slide(slides_dir, sid, csv_path))
            with open_slide(paths[-1], kwargs.get("backend", "auto")) as slide:
                geometry = tile_geometry(slide, patch_size, magnification, default_mpp=default_mpp)
            levels.append(geometry.patch_level)
            sizes.append(geometry.patch_size)
        position = {sid: i for i, sid in enumerate(slide_ids)}
        index = np.array([position[row[0]] for row in rows], np.int32)
        coords = np.array([(row[1], row[2]) for row in rows], np.int64).reshape(-1, 2)
        labels = np.array([row[3] for row in rows], np.int32)
        return cls(paths, index, coords, levels, sizes, tile_size=patch_size, labels=labels,
                   describe_tile=lambda i: f"{csv_path}: line {i + 2}", **kwargs)

    # -- random access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"WSITileSource index {index} out of range for {len(self)} tiles")
        s = int(self.slide_index[index])
        size = int(self.patch_size[s])
        region = self._slide(s).read_region(tuple(self.coords[index]), int(self.patch_level[s]), (size, size))
        if size != self.tile_size:
            region = np.asarray(Image.fromarray(region).resize((self.tile_size, self.tile_size),
                                                               Image.Resampling.BILINEAR))
        example = {"image": region, "slide": np.int32(s), "coords": self.coords[index].copy()}
        if self.labels is not None:
            example["label"] = np.int32(self.labels[index])
        return example

    def describe(self, index: int) -> str:
        """Tile `index`'s slide file and level-0 corner (for errors, `medjax.data.pipelines.bad_examples`)."""
        return f"{self.slide_paths[int(self.slide_index[index])]}: tile {index} at (x, y) = {self.coords[index].tolist()}"

    def _slide(self, s: int):
        cache = getattr(self._local, "slides", None)
        if cache is None:
            cache = self._local.slides = OrderedDict()
        if s in cache:
            cache.move_to_end(s)
            return cache[s]
        slide = open_slide(self.slide_paths[s], self.backend)
        cache[s] = slide
        while len(cache) > self.max_open_slides:
            cache.popitem(last=False)[1].close()
        return slide

    def close(self) -> None:
        """Close the slides this thread opened."""
        for slide in getattr(self._local, "slides", {}).values():
            slide.close()
        self._local.slides = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"]  # open slides stay in the process (and thread) that opened them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"WSITileSource({len(self)} tiles from {len(self.slide_paths)} slides, tile_size={self.tile_size})"


def _find_slide(slides_dir: str, sid: str, referenced_by: str) -> str:
    for ext in SLIDE_EXTENSIONS:
        for candidate in (sid + ext, sid + ext.upper()):
            path = os.path.join(slides_dir, candidate)
            if os.path.isfile(path):
                return path
    raise ValueError(f"{referenced_by}: no slide {sid!r} in {slides_dir} "
                     f"(looked for {sid}{{{','.join(SLIDE_EXTENSIONS)}}})")


def _read_label_rows(path: str) -> list[tuple[str, int, int, int]]:
    rows = []
    with open_text(path, "CSV of labelled tiles (slide_id,x,y,label)") as handle:
        reader = csv.DictReader(handle)
        missing = {"slide_id", "x", "y", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected slide_id,x,y,label")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((row["slide_id"], int(row["x"]), int(row["y"]), int(row["label"])))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: line {line}: x, y and label must be integers, got {row}") from error
    if not rows:
        raise ValueError(f"{path}: no labelled tiles")
    return rows


# ---- DINOv2 multi-crop augmentation ------------------------------------------------------------------

def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of a crop covering a uniform
    fraction `scale` of the area with a log-uniform aspect `ratio`; 10 tries, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (torchvision `rgb_to_grayscale`), (H, W, 3) float -> (H, W, 1)."""
    return (image @ _GRAY_WEIGHTS)[..., None]


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision `_rgb2hsv` on float RGB in [0, 1]: (hue in [0, 1), saturation, value)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc, minc = image.max(axis=-1), image.min(axis=-1)
    equal = maxc == minc
    chroma = maxc - minc
    sat = chroma / np.where(equal, 1.0, maxc)
    divisor = np.where(equal, 1.0, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = np.where(equal, 0.0, hue)
    return np.mod(hue / 6.0 + 1.0, 1.0), sat, maxc


def hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, value: np.ndarray) -> np.ndarray:
    """torchvision `_hsv2rgb`."""
    sector = np.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.astype(np.int32) % 6
    p = np.clip(value * (1.0 - sat), 0.0, 1.0)
    q = np.clip(value * (1.0 - sat * frac), 0.0, 1.0)
    t = np.clip(value * (1.0 - sat * (1.0 - frac)), 0.0, 1.0)
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    channels = [np.choose(sector, [c[k] for c in choices]) for k in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def color_jitter(rng: np.random.Generator, image: np.ndarray, brightness: float, contrast: float,
                 saturation: float, hue: float) -> np.ndarray:
    """torchvision `ColorJitter`: the four adjustments in a random order, factors uniform in
    [1 - x, 1 + x] (hue: [-x, x]), on a float image in [0, 1]."""
    order = rng.permutation(4)
    factors = (rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue))
    for op in order:
        f = factors[op]
        if op == 0:
            image = np.clip(image * f, 0.0, 1.0)
        elif op == 1:
            image = np.clip(f * image + (1 - f) * grayscale(image).mean(), 0.0, 1.0)
        elif op == 2:
            image = np.clip(f * image + (1 - f) * grayscale(image), 0.0, 1.0)
        else:
            h, s, v = rgb_to_hsv(image)
            image = hsv_to_rgb(np.mod(h + f, 1.0), s, v)
    return image.astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float, kernel_size: int = 9) -> np.ndarray:
    """torchvision `GaussianBlur(kernel_size)`: a separable normalised Gaussian, reflect padding."""
    x = np.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    image = ndimage.correlate1d(image, kernel, axis=0, mode="mirror")
    return ndimage.correlate1d(image, kernel, axis=1, mode="mirror")


@dataclasses.dataclass(frozen=True)
class DinoMultiCrop:
    """DINOv2 `DataAugmentationDINO` (module doc) as a transform `(example, rng) -> example`: replaces
    `example["image"]` (uint8 (H, W, 3)) with "global_crops" (2, 224, 224, 3) and "local_crops"
    (8, 96, 96, 3), float32, ImageNet-normalised."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    num_local: int = 8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2  # second global crop only
    normalize: bool = True

    def crop(self, rng: np.random.Generator, image: Image.Image, size: int, scale: tuple[float, float],
             blur_prob: float, solarize_prob: float = 0.0) -> np.ndarray:
        """One view: random resized crop (bicubic), flip, colour jitter, grayscale, blur, solarize, normalise."""
        top, left, h, w = random_resized_crop_box(rng, image.height, image.width, scale)
        view = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        pixels = np.asarray(view, np.float32) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        if rng.random() < self.jitter_prob:
            pixels = color_jitter(rng, pixels, *self.jitter)
        if rng.random() < self.grayscale_prob:
            pixels = np.repeat(grayscale(pixels), 3, axis=-1)
        if rng.random() < blur_prob:
            pixels = gaussian_blur(pixels, rng.uniform(*self.blur_sigma))
        if solarize_prob and rng.random() < solarize_prob:
            pixels = np.where(pixels >= 128 / 255, 1.0 - pixels, pixels)
        if self.normalize:
            pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
        return np.ascontiguousarray(pixels, np.float32)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        image = np.asarray(example["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"DinoMultiCrop: example['image'] must be uint8 (H, W, 3), "
                             f"got {image.dtype} {image.shape}")
        pil = Image.fromarray(image)
        first, second, local = self.blur_probs
        out = {key: value for key, value in example.items() if key != "image"}
        out["global_crops"] = np.stack([
            self.crop(rng, pil, self.global_size, self.global_scale, first),
            self.crop(rng, pil, self.global_size, self.global_scale, second, self.solarize_prob)])
        out["local_crops"] = np.stack([self.crop(rng, pil, self.local_size, self.local_scale, local)
                                       for _ in range(self.num_local)])
        return out
