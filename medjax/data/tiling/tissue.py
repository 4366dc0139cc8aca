"""Tissue segmentation of a whole-slide thumbnail: CLAM's recipe (Lu et al., Nat. Biomed. Eng. 2021,
`WholeSlideImage.segmentTissue` with its defaults) in numpy/scipy instead of OpenCV.

1. RGB -> HSV saturation (OpenCV's 8-bit arithmetic for 255 * (max - min) / max);
2. median blur, `median_size` 7 (OpenCV `medianBlur`, edges replicated);
3. binary threshold: saturation > `saturation_threshold` (8), or > Otsu's threshold with `use_otsu`;
4. morphological closing with a `close_size` x `close_size` (4) square (`close_binary`: unlike
   OpenCV's, it does not shift the mask by a pixel);
5. contours with holes (OpenCV `RETR_CCOMP`): a tissue region is an 8-connected foreground component,
   a hole a 4-connected background component it encloses (not touching the image border);
6. area filters: a region is kept when its area (holes excluded) exceeds `min_tissue_area` reference
   patches (CLAM `a_t`); of its holes the `max_holes` (8) largest are kept when each exceeds
   `min_hole_area` reference patches (CLAM `a_h`); holes not kept count as tissue;
7. the mask: kept regions filled, minus kept holes and the tissue pixels 4-adjacent to them (filling
   OpenCV's hole contour, which runs through those pixels, removes them too).

Areas are pixel counts where CLAM uses `cv2.contourArea` of the traced polygon (which runs through
pixel centres, so it is smaller by about half the perimeter). On the demo slides this module's mask,
moved one pixel right and down, equals CLAM's (OpenCV 5.0's closing and contours, filtered and drawn
as CLAM does) pixel for pixel. CLAM's reference patch is 512 level-0 pixels with `a_t` 100, `a_h` 16;
here it is the tile's level-0 size with defaults 4 and 1 (small biopsies and the demo's slides keep
their tissue), both configurable.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from medjax.data.readers.wsi import Slide, SlideError, best_level_for_downsample

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)
# OpenCV's `sdiv_table` (color_hsv.simd.hpp): saturate_cast<int>((255 << 12) / v), rounding half to even.
_SATURATION_DIV = np.concatenate([[0], np.round((255 << 12) / np.arange(1, 256)).astype(np.int64)])


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """CLAM's segmentation parameters (`seg_params` / `filter_params`) under descriptive names."""

    saturation_threshold: int = 8  # sthresh
    median_size: int = 7  # mthresh (odd)
    use_otsu: bool = False
    close_size: int = 4  # close; 0 disables the closing
    min_tissue_area: float = 4.0  # a_t, in reference patches
    min_hole_area: float = 1.0  # a_h, in reference patches
    max_holes: int = 8  # max_n_holes
    mask_downsample: float = 64.0  # the thumbnail is the level with the largest downsample <= this

    def __post_init__(self):
        if self.median_size < 1 or self.median_size % 2 == 0:
            raise ValueError(f"TissueParams.median_size must be odd and positive, got {self.median_size}")
        if not 0 <= self.saturation_threshold < 255:
            raise ValueError(f"TissueParams.saturation_threshold must be in [0, 255), got {self.saturation_threshold}")
        if self.close_size < 0 or self.max_holes < 0 or self.min_tissue_area < 0 or self.min_hole_area < 0:
            raise ValueError(f"TissueParams: close_size, max_holes and the areas must be >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class TissueRegion:
    """One kept tissue region of the mask: its label, bounding box (x0, y0, x1, y1; end exclusive, mask
    pixels), tissue area and the areas of its kept holes (mask pixels)."""

    label: int
    bbox: tuple[int, int, int, int]
    area: int
    hole_areas: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TissueMask:
    """Labels at the thumbnail level: region `label` (1..K) on tissue and on filled holes, 0 on glass
    and on kept holes. `downsample` = level-0 pixels per mask pixel along (x, y)."""

    labels: np.ndarray
    downsample: tuple[float, float]
    regions: tuple[TissueRegion, ...]
    level: int = 0

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    def labels_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region labels at level-0 points (x, y); 0 outside the mask."""
        col = np.floor(np.asarray(x, np.float64) / self.downsample[0]).astype(np.int64)
        row = np.floor(np.asarray(y, np.float64) / self.downsample[1]).astype(np.int64)
        h, w = self.labels.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.zeros(np.shape(col), np.int32)
        out[inside] = self.labels[row[inside], col[inside]]
        return out

    def bbox_level0(self, region: TissueRegion) -> tuple[int, int, int, int]:
        """A region's bounding box in level-0 pixels (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = region.bbox
        dx, dy = self.downsample
        return int(x0 * dx), int(y0 * dy), int(np.ceil(x1 * dx)), int(np.ceil(y1 * dy))


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


def close_binary(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing with a `size` x `size` square: dilation, then erosion with the reflected
    square, pixels outside the image ignored (OpenCV's border rule). OpenCV's `morphologyEx(MORPH_CLOSE)`
    erodes with the same anchored square instead, which for an even size (CLAM's 4) also shifts the mask
    one pixel right and down; this closing does not shift."""
    if size <= 0:
        return mask
    mask = np.asarray(mask).astype(np.uint8)
    dilated = ndimage.maximum_filter(mask, size=size, mode="constant", cval=0)
    origin = -1 if size % 2 == 0 else 0  # reflect the even window (offsets -s/2..s/2-1 -> -s/2+1..s/2)
    return ndimage.minimum_filter(dilated, size=size, origin=origin, mode="constant", cval=1).astype(bool)


def threshold_tissue(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Steps 1-4: the closed binary foreground of an RGB thumbnail."""
    saturation = ndimage.median_filter(rgb_to_saturation(rgb), size=params.median_size, mode="nearest")
    threshold = otsu_threshold(saturation) if params.use_otsu else params.saturation_threshold
    return close_binary(saturation > threshold, params.close_size)


def label_tissue(foreground: np.ndarray, *, min_area: float, min_hole_area: float, max_holes: int
                 ) -> tuple[np.ndarray, tuple[TissueRegion, ...]]:
    """Steps 5-6 on a binary mask; `min_area` and `min_hole_area` in mask pixels (strict >)."""
    foreground = np.asarray(foreground, bool)
    h, w = foreground.shape
    fg_labels, n_fg = ndimage.label(foreground, structure=_EIGHT)
    bg_labels, n_bg = ndimage.label(~foreground, structure=_FOUR)
    fg_area = np.bincount(fg_labels.ravel(), minlength=n_fg + 1)
    bg_area = np.bincount(bg_labels.ravel(), minlength=n_bg + 1)
    on_border = np.zeros(n_bg + 1, bool)
    on_border[np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])] = True
    # The first pixel (raster order) of an enclosed background component has the pixel above it in
    # the image and in the foreground component that encloses it.
    present, first = np.unique(bg_labels.ravel(), return_index=True)
    owner = np.zeros(n_bg + 1, np.int64)
    holes = present[(present > 0) & ~on_border[present]]
    owner[holes] = fg_labels.ravel()[first[np.searchsorted(present, holes)] - w]

    fg_map = np.zeros(n_fg + 1, np.int32)
    bg_map = np.zeros(n_bg + 1, np.int32)
    kept_holes: dict[int, tuple[int, ...]] = {}
    kept_hole_ids: list[int] = []
    next_label = 0
    for component in range(1, n_fg + 1):
        if not fg_area[component] > min_area:
            continue
        next_label += 1
        fg_map[component] = next_label
        own = holes[owner[holes] == component]
        own = own[np.argsort(-bg_area[own], kind="stable")]
        keep = [int(hole) for hole in own[:max_holes] if bg_area[hole] > min_hole_area]
        bg_map[own] = next_label  # holes not kept are tissue
        bg_map[keep] = 0
        kept_holes[next_label] = tuple(int(bg_area[hole]) for hole in keep)
        kept_hole_ids += keep
    labels = np.where(foreground, fg_map[fg_labels], bg_map[bg_labels]).astype(np.int32)
    if kept_hole_ids:  # OpenCV's hole contour runs through the tissue pixels bordering the hole
        hole_mask = np.zeros(n_bg + 1, bool)
        hole_mask[kept_hole_ids] = True
        labels[ndimage.binary_dilation(hole_mask[bg_labels], _FOUR)] = 0
    regions = []
    for label, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None:
            continue
        rows, cols = slices
        area = int(np.count_nonzero((labels[slices] == label) & foreground[slices]))
        regions.append(TissueRegion(label, (cols.start, rows.start, cols.stop, rows.stop), area, kept_holes[label]))
    return labels, tuple(regions)


def segment_tissue(rgb: np.ndarray, params: TissueParams = TissueParams(), *, reference_area: float = 1.0
                   ) -> tuple[np.ndarray, tuple[TissueRegion, ...]]:
    """The labelled tissue mask of an RGB thumbnail; `reference_area` = one reference patch in thumbnail
    pixels (the unit of `params.min_tissue_area` / `min_hole_area`)."""
    foreground = threshold_tissue(rgb, params)
    return label_tissue(foreground, min_area=params.min_tissue_area * reference_area,
                        min_hole_area=params.min_hole_area * reference_area, max_holes=params.max_holes)


def tissue_mask(slide: Slide, params: TissueParams = TissueParams(), *, reference_patch: float = 256.0,
                max_pixels: int = 1 << 26) -> TissueMask:
    """The tissue mask of a slide at the level nearest below `params.mask_downsample`;
    `reference_patch` is the reference patch side in level-0 pixels."""
    level = best_level_for_downsample(slide, params.mask_downsample)
    width, height = slide.level_dimensions[level]
    if width * height > max_pixels:
        raise SlideError(f"{slide.path}: the lowest-resolution level usable for the tissue mask (level {level}, "
                         f"{width}x{height}) exceeds {max_pixels} pixels; the slide needs a pyramid")
    thumbnail = slide.read_region((0, 0), level, (width, height))
    w0, h0 = slide.level_dimensions[0]
    downsample = (w0 / width, h0 / height)
    reference_area = reference_patch ** 2 / (downsample[0] * downsample[1])
    labels, regions = segment_tissue(thumbnail, params, reference_area=reference_area)
    return TissueMask(labels, downsample, regions, level)
