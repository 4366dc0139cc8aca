"""Tile coordinates of whole-slide images at a target magnification, in CLAM's HDF5 layout.

    python -m medjax.data tile --slides DIR --out DIR [--patch-size 256 --magnification 20]

writes `<out>/<slide_id>.h5` per slide with a dataset `coords` (N, 2) int64 of level-0 (x, y) top-left
corners whose attributes are CLAM's (`create_patches_fp.py`; Lu et al., Nat. Biomed. Eng. 2021):
`patch_size` and `patch_level` (read `patch_size` x `patch_size` pixels at `patch_level` from each
corner: CLAM's `extract_features_fp.py` and our `WSITileSource` both do), `downsample`,
`downsampled_level_dim`, `level_dim`, `name`; and ours: `target_patch_size` (the side after
resizing), `patch_size_level0` (the grid step), `magnification`, `mpp`, `use_padding` (1: edge tiles kept). It also writes
`<out>/tiling_report.csv` (slide, status, tiles, message: CLAM's process list) and, with `--save-mask` /
`--stitch`, `<out>/masks/<slide_id>.png` / `<out>/stitches/<slide_id>.png` previews (tiling/previews.py).

Magnification (UNI / CLAM practice): the slide's level-0 magnification is 10 / mpp, snapped to the
nearest standard objective (5, 10, 20, 40, 60, 80x) within 15% (an Aperio "40x" at 0.252 um/px is
40x); a tile covers patch_size * mag0 / magnification level-0 pixels (256 at 20x: 512 on a 40x
slide), read at the coarsest level that needs no upsampling and resized to patch_size later.
Tiles are CLAM's, coordinate for coordinate (`WholeSlideImage.process_contour`, contour_fn "four_pt"): the
tissue contours of `medjax.data.tiling.tissue` (OpenCV's, at level 0); per region a grid from the corner of its
`cv2.boundingRect` with step = tile over the whole box (`use_padding=True`: tiles crossing the slide's edge are
kept, read past the edge as white; `use_padding=False` stops at width - tile + 1); a tile is kept when any of the
4 points at +-int(tile // 2 * 0.5) from its centre is inside or on the region's outer contour
(`isInContourV3_Easy`, pointPolygonTest >= 0) and its centre is not strictly inside a kept hole (`isInHoles`,
> 0). Regions come in contour order and a region with a single tile contributes none (CLAM's `len(results) > 1`).
Slides without a pyramid are segmented on level 0 (or a downsample of it; tissue.py).

Bad slides (truncated or unreadable files, no microns per pixel, a magnification below
the target) are reported as errors naming the slide, an empty tissue mask as a warning (no file is
written); the other slides are tiled all the same, and the exit status is 1 when any slide failed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
import warnings
from typing import Sequence

import numpy as np

from medjax.data.tiling.contours import bounding_rect, point_polygon_test
from medjax.data.tiling.previews import save_previews
from medjax.data.tiling.tissue import PRESETS, TissueContours, TissueParams, tissue_contours
from medjax.data.readers.wsi import Slide, SlideError, list_slides, open_slide, slide_id

STANDARD_OBJECTIVES = (5.0, 10.0, 20.0, 40.0, 60.0, 80.0)
SNAP_TOLERANCE = 0.15
REPORT_NAME = "tiling_report.csv"


class SlideWarning(UserWarning):
    """A slide that was skipped without being broken (an empty tissue mask)."""


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """How tiles of one slide are read: `patch_size` pixels at `patch_level` (CLAM's attributes),
    covering `patch_size_level0` level-0 pixels, resized to `target_patch_size`."""

    patch_level: int
    patch_size: int
    patch_size_level0: int
    target_patch_size: int
    magnification: float
    mpp: float
    level0_magnification: float


@dataclasses.dataclass(frozen=True)
class SlideTiling:
    """The outcome for one slide: status "ok" | "empty" | "error"."""

    slide_id: str
    path: str
    status: str
    num_tiles: int = 0
    message: str = ""
    h5_path: str | None = None


def level0_magnification(mpp: float) -> float:
    """10 / mpp, snapped to a standard objective when within SNAP_TOLERANCE of one."""
    magnification = 10.0 / mpp
    nearest = min(STANDARD_OBJECTIVES, key=lambda m: abs(m - magnification))
    return nearest if abs(nearest - magnification) <= SNAP_TOLERANCE * nearest else magnification


def tile_geometry(slide: Slide, patch_size: int = 256, magnification: float = 20.0, *,
                  default_mpp: float | None = None) -> TileGeometry:
    """The level and read size for `patch_size`-pixel tiles at `magnification` from the slide's mpp."""
    mpp = slide.mpp
    if mpp is None:
        if default_mpp is None:
            raise SlideError(f"{slide.path}: no microns per pixel (no TIFF resolution tags, no 'MPP =' or "
                             "PhysicalSizeX in the description, no openslide.mpp-x); pass --default-mpp to assume one")
        warnings.warn(f"{slide.path}: no microns per pixel; assuming {default_mpp}", SlideWarning, stacklevel=2)
        mpp = default_mpp
    mag0 = level0_magnification(mpp)
    if mag0 < magnification * (1 - 1e-6):
        raise SlideError(f"{slide.path}: level 0 is {mag0:g}x ({mpp:g} um/px), below the requested "
                         f"{magnification:g}x; tiles would need upsampling")
    size0 = int(round(patch_size * mag0 / magnification))
    level, read_size = 0, size0
    for index, downsample in enumerate(slide.level_downsamples):
        size = int(round(size0 / downsample))
        if size >= patch_size and abs(size * downsample - size0) <= 0.01 * size0:
            level, read_size = index, size
    return TileGeometry(level, read_size, size0, patch_size, float(magnification), float(mpp), float(mag0))


def contour_tiles(contour: np.ndarray, holes: Sequence[np.ndarray], level0_size: tuple[int, int], tile: int,
                  step: int | None = None, *, use_padding: bool = True) -> np.ndarray:
    """CLAM's `process_contour` with `contour_fn="four_pt"` (module doc): the (N, 2) int64 level-0 corners of one
    region's kept tiles, in CLAM's order (x-major over its bounding-box grid)."""
    step = step or tile
    x0, y0, w, h = bounding_rect(contour)
    if use_padding:
        stop_x, stop_y = x0 + w, y0 + h
    else:
        stop_x, stop_y = min(x0 + w, level0_size[0] - tile + 1), min(y0 + h, level0_size[1] - tile + 1)
    grid_x, grid_y = np.meshgrid(np.arange(x0, stop_x, step), np.arange(y0, stop_y, step), indexing="ij")
    corners = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)
    if not len(corners):
        return corners.reshape(0, 2)
    shift = int(tile // 2 * 0.5)
    centres = corners + tile // 2
    keep = np.zeros(len(corners), bool)
    for dx, dy in ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)):
        keep |= point_polygon_test(contour, centres + (dx, dy)) >= 0  # isInContourV3_Easy: any point, edges count
    if holes and keep.any():
        # isInHoles: the centre (x + tile / 2, y + tile / 2) strictly inside a hole drops the tile
        centre = corners[keep] + tile / 2
        inside = np.zeros(len(centre), bool)
        for hole in holes:
            inside |= point_polygon_test(hole, centre.astype(np.int64)) > 0
        keep[np.flatnonzero(keep)[inside]] = False
    return corners[keep]


def tile_coordinates(tissue: TissueContours, level0_size: tuple[int, int], tile: int, step: int | None = None, *,
                     use_padding: bool = True) -> np.ndarray:
    """Every region's tiles (`contour_tiles`) concatenated in region order, as CLAM's `process_contours` writes them;
    a region with a single kept tile contributes none (CLAM keeps a contour's coords only when `len(results) > 1`)."""
    found = [contour_tiles(contour, holes, level0_size, tile, step, use_padding=use_padding)
             for contour, holes in zip(tissue.contours, tissue.holes)]
    found = [coords for coords in found if len(coords) > 1]
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def write_coords(path: str, coords: np.ndarray, geometry: TileGeometry, slide: Slide, use_padding: bool = False) -> None:
    """`coords` and its attributes (module doc) to an HDF5 file, written atomically."""
    import h5py

    level = geometry.patch_level
    partial = path + ".partial"
    with h5py.File(partial, "w") as handle:
        dataset = handle.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        w0, h0 = slide.level_dimensions[0]
        wl, hl = slide.level_dimensions[level]
        attrs = {"patch_size": geometry.patch_size, "patch_level": level,
                 "downsample": np.array([w0 / wl, h0 / hl]), "downsampled_level_dim": np.array([wl, hl]),
                 "level_dim": np.array([wl, hl]), "name": slide.slide_id,
                 "target_patch_size": geometry.target_patch_size, "patch_size_level0": geometry.patch_size_level0,
                 "magnification": geometry.magnification, "mpp": geometry.mpp, "use_padding": int(use_padding)}
        for key, value in attrs.items():
            dataset.attrs[key] = value
    os.replace(partial, path)


def integer_coords(coords: np.ndarray, where) -> np.ndarray:
    """(N, 2) int64 of tile corners given as integers or integral floats; `where(row)` names a bad row
    (NaN, infinite or fractional) in the ValueError."""
    coords = np.asarray(coords)
    if coords.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(coords).all(axis=1) | (coords != np.round(coords)).any(axis=1))
        if bad.size:
            raise ValueError(f"{where(int(bad[0]))}: tile corner (x, y) = {coords[bad[0]].tolist()} is not a pair of "
                             f"integer pixel coordinates ({bad.size} such row(s))")
    elif coords.dtype.kind not in "iu" and coords.size:
        raise ValueError(f"{where(0)}: tile corners have dtype {coords.dtype}; expected integers")
    return coords.astype(np.int64).reshape(-1, 2)


def read_coords(path: str) -> tuple[np.ndarray, dict]:
    """(coords (N, 2) int64, attributes) of a CLAM / medjax coordinates file."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise ValueError(f"{path}: no dataset 'coords'; expected CLAM's layout (coords (N, 2) with "
                                 "attributes patch_size, patch_level)")
            dataset = handle["coords"]
            raw = np.asarray(dataset[()])
            attrs = {key: (value.item() if isinstance(value, np.generic) else value)
                     for key, value in dataset.attrs.items()}
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise ValueError(f"{path}: dataset 'coords' has shape {raw.shape}, expected (N, 2)")
    coords = integer_coords(raw, lambda row: f"{path}: row {row} of dataset 'coords'")
    for key in ("patch_size", "patch_level"):
        if key not in attrs:
            raise ValueError(f"{path}: dataset 'coords' lacks the attribute {key!r}")
    return coords, attrs


def tile_slide(path: str, out_dir: str, *, patch_size: int = 256, magnification: float = 20.0,
               params: TissueParams = TissueParams(), default_mpp: float | None = None,
               use_padding: bool = True, save_mask: bool = False, stitch: bool = False) -> SlideTiling:
    """Tile one slide into `<out_dir>/<slide_id>.h5` (and `masks/`, `stitches/` previews: tiling/previews.py);
    raises SlideError for a bad slide and warns (SlideWarning) on an empty tissue mask."""
    with open_slide(path) as slide:
        geometry = tile_geometry(slide, patch_size, magnification, default_mpp=default_mpp)
        tissue = tissue_contours(slide, params)
        coords = tile_coordinates(tissue, slide.level_dimensions[0], geometry.patch_size_level0,
                                  use_padding=use_padding)
        if save_mask or stitch:
            save_previews(out_dir, slide.slide_id, tissue, coords, geometry.patch_size_level0, mask=save_mask,
                          stitch=stitch)
        if len(coords) == 0:
            message = (f"{path}: empty tissue mask ({len(tissue.contours)} tissue regions above min_tissue_area = "
                       f"{params.min_tissue_area:g} patches of {params.reference_patch}x{params.reference_patch} "
                       "level-0 px (CLAM a_t), no tile in tissue); no coordinates written (small slides: a lower "
                       "--min-tissue-area)")
            warnings.warn(message, SlideWarning, stacklevel=2)
            return SlideTiling(slide.slide_id, path, "empty", 0, message)
        h5_path = os.path.join(out_dir, f"{slide.slide_id}.h5")
        write_coords(h5_path, coords, geometry, slide, use_padding)
        return SlideTiling(slide.slide_id, path, "ok", len(coords), "", h5_path)


class _Progress:
    """A one-line progress bar on a TTY, one line per item otherwise."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream, self.start = total, stream or sys.stderr, time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, text: str) -> None:
        elapsed = time.monotonic() - self.start
        if self.tty:
            bar = "#" * int(30 * done / max(self.total, 1))
            self.stream.write(f"\r[{bar:.<30}] {done}/{self.total} slides {elapsed:.0f}s {text}\033[K")
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"tile {done}/{self.total} {text}\n")
        self.stream.flush()


def tile_slides(slides: list[str], out_dir: str, *, patch_size: int = 256, magnification: float = 20.0,
                params: TissueParams = TissueParams(), default_mpp: float | None = None,
                use_padding: bool = True, save_mask: bool = False, stitch: bool = False,
                stream=None) -> list[SlideTiling]:
    """Tile every slide; a bad slide is reported (and logged to `stream`) and the rest go on."""
    os.makedirs(out_dir, exist_ok=True)
    progress = _Progress(len(slides), stream)
    results = []
    for done, path in enumerate(slides, start=1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SlideWarning)
            try:
                result = tile_slide(path, out_dir, patch_size=patch_size, magnification=magnification,
                                    params=params, default_mpp=default_mpp, use_padding=use_padding,
                                    save_mask=save_mask, stitch=stitch)
            except Exception as error:  # every failure of one slide, named; the batch goes on
                message = str(error) if isinstance(error, SlideError) else f"{path}: {type(error).__name__}: {error}"
                result = SlideTiling(slide_id(path), path, "error", 0, message)
        for warning in caught:
            warnings.warn(warning.message, warning.category, stacklevel=2)
        results.append(result)
        text = f"{result.slide_id}: {result.num_tiles} tiles" if result.status == "ok" else \
            f"{result.slide_id}: {result.status.upper()} {result.message}"
        progress.update(done, text)
    _write_report(os.path.join(out_dir, REPORT_NAME), results)
    return results


def _write_report(path: str, results: list[SlideTiling]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "path", "status", "num_tiles", "message"])
        for result in results:
            writer.writerow([result.slide_id, result.path, result.status, result.num_tiles, result.message])


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tile` subcommand's options; the segmentation options override the `--preset`'s values."""
    parser.add_argument("--slides", required=True, help="directory of slides (.tif/.tiff/.svs/.ndpi/.mrxs/...)")
    parser.add_argument("--out", required=True, help="output directory for <slide_id>.h5 files")
    parser.add_argument("--patch-size", type=int, default=256, help="tile side in pixels at the target magnification")
    parser.add_argument("--magnification", type=float, default=20.0, help="target magnification (20 = 0.5 um/px)")
    parser.add_argument("--default-mpp", type=float, default=None,
                        help="microns per pixel assumed for slides that record none (default: such slides fail)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="CLAM's presets/*.csv segmentation values (default: create_patches_fp.py's)")
    parser.add_argument("--seg-threshold", type=int, default=None, help="saturation threshold (CLAM sthresh)")
    parser.add_argument("--otsu", action="store_true", default=None, help="Otsu's threshold instead of --seg-threshold")
    parser.add_argument("--median-size", type=int, default=None, help="median blur size (CLAM mthresh)")
    parser.add_argument("--close-size", type=int, default=None, help="closing kernel size (CLAM close)")
    parser.add_argument("--min-tissue-area", type=float, default=None,
                        help="smallest tissue region kept, in 512x512 level-0 patches (CLAM a_t)")
    parser.add_argument("--min-hole-area", type=float, default=None,
                        help="smallest hole kept, in 512x512 level-0 patches (CLAM a_h)")
    parser.add_argument("--max-holes", type=int, default=None, help="holes kept per region (CLAM max_n_holes)")
    parser.add_argument("--mask-downsample", type=float, default=None,
                        help="downsample of the pyramid level the tissue mask is computed on (CLAM seg_level -1: 64)")
    parser.add_argument("--save-mask", action="store_true",
                        help="write masks/<slide_id>.png: the thumbnail with tissue contours and holes (CLAM --seg)")
    parser.add_argument("--stitch", action="store_true",
                        help="write stitches/<slide_id>.png: the kept tiles on a black canvas (CLAM --stitch)")
    parser.add_argument("--no-padding", action="store_true",
                        help="drop tiles crossing the slide's edge (CLAM use_padding=False; default: kept, read as white)")


_OPTION_FIELDS = {"seg_threshold": "saturation_threshold", "otsu": "use_otsu", "median_size": "median_size",
                  "close_size": "close_size", "min_tissue_area": "min_tissue_area", "min_hole_area": "min_hole_area",
                  "max_holes": "max_holes", "mask_downsample": "mask_downsample"}


def params_from_args(args: argparse.Namespace) -> TissueParams:
    """The preset's TissueParams with the options given on the command line replacing its values."""
    changes = {field: getattr(args, option) for option, field in _OPTION_FIELDS.items()
               if getattr(args, option, None) is not None}
    return dataclasses.replace(PRESETS[args.preset], **changes)


def run_tile(args: argparse.Namespace) -> int:
    """Run the `tile` subcommand; 0 when every slide was tiled or only warned about, 1 otherwise."""
    params = params_from_args(args)
    slides = list_slides(args.slides)
    if not slides:
        print(f"{args.slides}: no slide files (extensions .tif .tiff .svs .ndpi .mrxs ...)", file=sys.stderr)
        return 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlideWarning)  # shown on the progress line and in the report
        results = tile_slides(slides, args.out, patch_size=args.patch_size, magnification=args.magnification,
                              params=params, default_mpp=args.default_mpp, use_padding=not args.no_padding,
                              save_mask=args.save_mask, stitch=args.stitch)
    failed = [r for r in results if r.status == "error"]
    empty = [r for r in results if r.status == "empty"]
    tiles = sum(r.num_tiles for r in results)
    print(f"tiled {len(results) - len(failed) - len(empty)}/{len(results)} slides, {tiles} tiles -> {args.out} "
          f"({len(empty)} with empty tissue masks, {len(failed)} failed; see {os.path.join(args.out, REPORT_NAME)})")
    for result in failed:
        print(f"error: {result.message}", file=sys.stderr)
    for result in empty:
        print(f"warning: {result.message}", file=sys.stderr)
    return 1 if failed else 0
