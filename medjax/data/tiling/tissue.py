"""Tissue segmentation of a whole-slide thumbnail exactly as CLAM's `WholeSlideImage.segmentTissue` (Lu et al.,
Nat. Biomed. Eng. 2021, with `create_patches_fp.py`'s defaults), in numpy/scipy instead of OpenCV.

1. RGB -> HSV saturation (OpenCV's 8-bit arithmetic for 255 * (max - min) / max);
2. median blur, `median_size` 7 (OpenCV `medianBlur`, edges replicated);
3. binary threshold: saturation > `saturation_threshold` (8), or > Otsu's threshold with `use_otsu`;
4. morphological closing with a `close_size` x `close_size` (4) square anchored at its centre as OpenCV's
   `morphologyEx(MORPH_CLOSE)`: dilation and erosion both over offsets -s/2..s/2-1, so for an even size the mask
   moves one pixel right and down (CLAM's grids start one mask pixel late: +64 level-0 px at downsample 64);
5. contours (`medjax.data.tiling.contours`, OpenCV's RETR_CCOMP): outer borders with their holes;
6. CLAM's area filters, in units of a reference patch of `reference_patch` (512) level-0 pixels squared,
   `int(512^2 / (dx * dy))` thumbnail pixels: a region is kept when contourArea(outer) - sum of its holes'
   contourArea exceeds `min_tissue_area` (a_t, 100) units (and is not 0); of its holes the `max_holes` (8)
   largest by contourArea are kept when each exceeds `min_hole_area` (a_h, 16) units;
7. contours scaled to level 0 as CLAM does: int32(vertex * downsample) (truncated).

The thumbnail is the pyramid level with the largest downsample <= `mask_downsample` (64; OpenSlide's
`get_best_level_for_downsample(64)`, CLAM's `seg_level=-1`). A slide without a usable level (no pyramid) is
segmented on level 0 itself when it has at most `max_pixels`, as CLAM does; a larger one on a box-filtered
level-0 downsample by `mask_downsample`, read in bands (our choice: CLAM would read all of level 0).
`PRESETS` holds CLAM's `presets/*.csv` (`tcga`, `bwh_biopsy`, `bwh_resection`) and `demo` (our choice: areas
small enough for the few-tile demo slides).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

from medjax.data.readers.wsi import Slide, SlideError, best_level_for_downsample
from medjax.data.tiling.contours import Component, contour_area, find_components

# OpenCV's `sdiv_table` (color_hsv.simd.hpp): saturate_cast<int>((255 << 12) / v), rounding half to even.
_SATURATION_DIV = np.concatenate([[0], np.round((255 << 12) / np.arange(1, 256)).astype(np.int64)])


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """CLAM's segmentation parameters (`seg_params` / `filter_params`) under descriptive names; defaults
    `create_patches_fp.py`'s."""

    saturation_threshold: int = 8  # sthresh
    median_size: int = 7  # mthresh (odd)
    use_otsu: bool = False
    close_size: int = 4  # close; 0 disables the closing
    min_tissue_area: float = 100.0  # a_t, in reference patches
    min_hole_area: float = 16.0  # a_h, in reference patches
    max_holes: int = 8  # max_n_holes
    reference_patch: int = 512  # segmentTissue's ref_patch_size, level-0 pixels
    mask_downsample: float = 64.0  # the thumbnail is the level with the largest downsample <= this

    def __post_init__(self):
        if self.median_size < 1 or self.median_size % 2 == 0:
            raise ValueError(f"TissueParams.median_size must be odd and positive, got {self.median_size}")
        if not 0 <= self.saturation_threshold < 255:
            raise ValueError(f"TissueParams.saturation_threshold must be in [0, 255), got {self.saturation_threshold}")
        if self.close_size < 0 or self.max_holes < 0 or self.min_tissue_area < 0 or self.min_hole_area < 0:
            raise ValueError(f"TissueParams: close_size, max_holes and the areas must be >= 0, got {self}")
        if self.reference_patch < 1 or self.mask_downsample < 1:
            raise ValueError(f"TissueParams: reference_patch and mask_downsample must be >= 1, got {self}")


# CLAM's presets/*.csv (sthresh, mthresh, close, use_otsu, a_t, a_h, max_n_holes); every one uses use_padding=True
# and contour_fn four_pt.
PRESETS = {
    "default": TissueParams(),
    "tcga": TissueParams(
        saturation_threshold=8, median_size=7, close_size=4, min_tissue_area=16.0, min_hole_area=4.0, max_holes=8),
    "bwh_biopsy": TissueParams(saturation_threshold=15, median_size=11, close_size=2, min_tissue_area=1.0,
                               min_hole_area=1.0, max_holes=2),
    "bwh_resection": TissueParams(saturation_threshold=15, median_size=11, close_size=4, min_tissue_area=100.0,
                                  min_hole_area=16.0, max_holes=8),
    "demo": TissueParams(min_tissue_area=1.0, min_hole_area=0.25),  # our choice: the demo's small slides
}


@dataclasses.dataclass(frozen=True)
class TissueContours:
    """CLAM's `contours_tissue` / `holes_tissue`: level-0 int32 (K, 2) (x, y) polygons of the kept regions and,
    per region, its kept holes; with the thumbnail they came from (its level, downsample (dx, dy) and
    closed foreground mask) for previews."""

    contours: tuple[np.ndarray, ...]
    holes: tuple[tuple[np.ndarray, ...], ...]
    downsample: tuple[float, float]
    level: int
    foreground: np.ndarray
    thumbnail: np.ndarray


def rgb_to_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of a uint8 RGB image exactly as OpenCV's `cvtColor(RGB2HSV)` computes it:
    (max - min) * round(255 * 2^12 / max) / 2^12, rounded; 0 where max is 0."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_saturation: expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    high = rgb.max(axis=-1).astype(np.int64)
    low = rgb.min(axis=-1).astype(np.int64)
    return (((high - low) * _SATURATION_DIV[high] + (1 << 11)) >> 12).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (Otsu, IEEE SMC 1979): the t maximising the between-class
    variance of {<= t} and {> t}; the first such t (OpenCV's `THRESH_OTSU`)."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    omega = np.cumsum(hist)
    mu = np.cumsum(hist * np.arange(256))
    total = mu[-1]
    valid = (omega > 1e-12) & (omega < 1 - 1e-12)
    between = np.zeros(256)
    between[valid] = (total * omega[valid] - mu[valid]) ** 2 / (omega[valid] * (1 - omega[valid]))
    return int(np.argmax(between))


def close_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's `morphologyEx(mask, MORPH_CLOSE, ones((size, size)))`: dilation, then erosion, both over the
    window offsets -size//2 .. size - size//2 - 1 (the anchor at the centre), pixels outside the image ignored.
    For an even size the closed mask is shifted one pixel right and down (module doc)."""
    if size <= 0:
        return np.asarray(mask, bool)
    mask = np.asarray(mask).astype(np.uint8)
    dilated = ndimage.maximum_filter(mask, size=size, mode="constant", cval=0)
    return ndimage.minimum_filter(dilated, size=size, mode="constant", cval=1).astype(bool)


def threshold_tissue(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Steps 1-4: the closed binary foreground of an RGB thumbnail."""
    saturation = ndimage.median_filter(rgb_to_saturation(rgb), size=params.median_size, mode="nearest")
    threshold = otsu_threshold(saturation) if params.use_otsu else params.saturation_threshold
    return close_mask(saturation > threshold, params.close_size)


def filter_components(components: list[Component], params: TissueParams, reference_area: int
                      ) -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """Step 6 (CLAM's `_filter_contours`): (outer, kept holes) of the regions kept; areas in thumbnail pixels,
    `reference_area` = int(reference_patch^2 / (dx * dy))."""
    min_area, min_hole = params.min_tissue_area * reference_area, params.min_hole_area * reference_area
    kept = []
    for component in components:
        hole_areas = [contour_area(hole) for hole in component.holes]
        area = contour_area(component.outer) - float(np.sum(hole_areas))
        if area == 0 or not min_area < area:
            continue
        order = sorted(range(len(component.holes)), key=lambda i: -hole_areas[i])[:params.max_holes]
        kept.append((component.outer, tuple(component.holes[i] for i in order if hole_areas[i] > min_hole)))
    return kept


def read_thumbnail(slide: Slide, params: TissueParams = TissueParams(), *, max_pixels: int = 1 << 26
                   ) -> tuple[np.ndarray, int, tuple[float, float]]:
    """(RGB thumbnail, its level, downsample (dx, dy) = level-0 pixels per thumbnail pixel), as the module doc says."""
    level = best_level_for_downsample(slide, params.mask_downsample)
    width, height = slide.level_dimensions[level]
    w0, h0 = slide.level_dimensions[0]
    if width * height <= max_pixels:
        return slide.read_region((0, 0), level, (width, height)), level, (w0 / width, h0 / height)
    if level > 0:
        raise SlideError(f"{slide.path}: the lowest-resolution level usable for the tissue mask (level {level}, "
                         f"{width}x{height}) exceeds {max_pixels} pixels")
    factor = max(int(params.mask_downsample), 1)
    band = factor * max(1, (1 << 24) // (w0 * factor))  # rows of level 0 per read, a multiple of the factor
    parts = []
    for y in range(0, h0, band):
        rows = min(band, h0 - y)
        parts.append(np.asarray(Image.fromarray(slide.read_region((0, y), 0, (w0, rows))).reduce(factor)))
    thumbnail = np.concatenate(parts)
    return thumbnail, 0, (w0 / thumbnail.shape[1], h0 / thumbnail.shape[0])


def tissue_contours(slide: Slide, params: TissueParams = TissueParams(), *, max_pixels: int = 1 << 26
                    ) -> TissueContours:
    """CLAM's tissue contours of a slide at level 0 (module doc, steps 1-7)."""
    thumbnail, level, (dx, dy) = read_thumbnail(slide, params, max_pixels=max_pixels)
    foreground = threshold_tissue(thumbnail, params)
    reference_area = int(params.reference_patch ** 2 / (dx * dy))
    kept = filter_components(find_components(foreground), params, reference_area)
    scale = np.array([dx, dy])

    def to_level0(contour):
        return np.asarray(contour * scale, np.int32)

    return TissueContours(tuple(to_level0(outer) for outer, _ in kept),
                          tuple(tuple(to_level0(hole) for hole in holes) for _, holes in kept),
                          (float(dx), float(dy)), level, foreground, thumbnail)
