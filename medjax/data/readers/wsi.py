"""Whole-slide images: pyramidal TIFF read with tifffile, vendor formats with OpenSlide when installed.

    slide = open_slide("slides/case_01.tif")
    slide.level_dimensions            # ((w0, h0), (w1, h1), ...), OpenSlide's order (width first)
    slide.mpp                         # microns per level-0 pixel
    tile = slide.read_region((x, y), level, (w, h))   # uint8 (h, w, 3); (x, y) in level-0 pixels

Microns per pixel come, in order, from the TIFF resolution tags (XResolution with ResolutionUnit
inch or centimetre), an Aperio ImageDescription (`MPP = 0.2520`), or OME-XML `PhysicalSizeX`
(micrometres). Levels are tifffile's `series[0].levels` (SubIFD pyramids and successive
reduced-resolution pages alike); only the tiles / strips a region touches are read and decoded.
Every problem raises a `SlideError` naming the slide file: unreadable or truncated files (a
segment past the end of the file), unsupported layouts, missing microns per pixel when asked for.

`medjax.data.readers.wsi_write.write_pyramidal_tiff` writes the layout this reader and OpenSlide's generic-TIFF
reader both read: tiled pages, level 0 first, each reduced level a following page with NewSubfileType 1, resolution
tags in centimetres, an Aperio-style `MPP = ` in the description.
"""
from __future__ import annotations

import math
import os
import re
import threading
from typing import Protocol

import numpy as np

from medjax.data.errors import DataFileNotFoundError
from medjax.errors import MedjaxInputError

# Vendor formats OpenSlide reads; of these, tifffile also reads the TIFF-based .svs, .ndpi and .bif.
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFFFILE_EXTENSIONS = (".tif", ".tiff", ".svs", ".ndpi", ".bif")
SLIDE_EXTENSIONS = tuple(sorted(set(OPENSLIDE_EXTENSIONS + TIFFFILE_EXTENSIONS)))
BACKGROUND = 255  # pixels outside the slide read as white glass

_MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre
_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_OME_SIZE_X = re.compile(r'PhysicalSizeX="([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"')
_OME_UNIT_X = re.compile(r'PhysicalSizeXUnit="([^"]*)"')
_OME_MICRONS = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3}


class SlideError(MedjaxInputError):
    """A slide that cannot be used; the message starts with the slide's path."""


class Slide(Protocol):
    """What tiling and the tile source need from a whole-slide image (OpenSlide's API, numpy out)."""

    path: str

    @property
    def slide_id(self) -> str: ...
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def level_downsamples(self) -> tuple[float, ...]: ...
    @property
    def mpp(self) -> float | None: ...
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...
    def close(self) -> None: ...


def slide_id(path: str) -> str:
    """The file name without its extension (`case_01.svs` -> `case_01`)."""
    return os.path.splitext(os.path.basename(path))[0]


def best_level_for_downsample(slide: Slide, downsample: float) -> int:
    """OpenSlide's rule: the level with the largest downsample not above `downsample` (level 0 if none)."""
    best = 0
    for level, level_downsample in enumerate(slide.level_downsamples):
        if level_downsample <= downsample * (1 + 1e-6):
            best = level
    return best


def mpp_from_tiff_tags(page, description: str = "") -> float | None:
    """Microns per pixel from a TIFF page's resolution tags, else from an Aperio / OME-XML description."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    resolution = tags.get("XResolution")
    if unit is not None and resolution is not None and int(unit.value) in _MICRONS_PER_UNIT:
        numerator, denominator = resolution.value
        if numerator > 0 and denominator > 0:
            return _MICRONS_PER_UNIT[int(unit.value)] * denominator / numerator
    match = _APERIO_MPP.search(description or "")
    if match and float(match.group(1)) > 0:
        return float(match.group(1))
    match = _OME_SIZE_X.search(description or "")
    if match and float(match.group(1)) > 0:
        unit_match = _OME_UNIT_X.search(description)
        scale = _OME_MICRONS.get(unit_match.group(1) if unit_match else "µm")
        if scale is not None:
            return float(match.group(1)) * scale
    return None


class _TiffLevel:
    """One pyramid level: its page's segment (tile or strip) grid and decoder."""

    def __init__(self, page, path: str, index: int):
        self.page = page
        shape = tuple(page.shape)
        if page.planarconfig == 2:  # separate planes: (samples, H, W)
            samples, self.height, self.width = shape[-3:] if len(shape) >= 3 else (1,) + shape
        else:
            self.height, self.width = shape[:2]
            samples = shape[2] if len(shape) == 3 else 1
        if samples not in (1, 3, 4) or np.dtype(page.dtype) != np.uint8 or getattr(page, "imagedepth", 1) > 1:
            raise SlideError(f"{path}: level {index} is {page.dtype} with {samples} samples per pixel "
                             f"(shape {shape}); expected 8-bit gray, RGB or RGBA")
        self.samples = samples
        self.planes = samples if page.planarconfig == 2 else 1
        if page.is_tiled:
            self.segment_h, self.segment_w = page.tilelength, page.tilewidth
        else:
            self.segment_h, self.segment_w = min(page.rowsperstrip or self.height, self.height), self.width
        self.grid_y = math.ceil(self.height / self.segment_h)
        self.grid_x = math.ceil(self.width / self.segment_w)
        expected = self.planes * self.grid_y * self.grid_x
        if len(page.dataoffsets) != expected:
            raise SlideError(f"{path}: level {index} has {len(page.dataoffsets)} data segments, expected "
                             f"{expected} for a {self.width}x{self.height} image in "
                             f"{self.segment_w}x{self.segment_h} segments")


class TiffSlide:
    """A pyramidal TIFF (generic tiled TIFF, OME-TIFF, Aperio .svs, Hamamatsu .ndpi) read with tifffile."""

    def __init__(self, path: str):
        import tifffile

        self.path = path
        self._lock = threading.Lock()  # the file handle is shared by the threads of one process
        if not os.path.isfile(path):
            raise SlideError(f"{path}: slide file not found")
        try:
            self._tiff = tifffile.TiffFile(path)
            series = self._tiff.series[0]
            pages = [_as_page(level.pages[0]) for level in series.levels]
        except Exception as error:  # tifffile raises TiffFileError, struct.error, ... on corrupt files
            raise SlideError(f"{path}: not a readable TIFF ({type(error).__name__}: {error})") from error
        try:
            self._levels = [_TiffLevel(page, path, index) for index, page in enumerate(pages)]
            self._check_not_truncated()
            self._mpp = mpp_from_tiff_tags(pages[0], pages[0].description)
        except Exception:
            self._tiff.close()
            raise

    def _check_not_truncated(self) -> None:
        size = self._tiff.filehandle.size
        for index, level in enumerate(self._levels):
            ends = np.asarray(level.page.dataoffsets, np.int64) + np.asarray(level.page.databytecounts, np.int64)
            past = np.flatnonzero(ends > size)
            if past.size:
                raise SlideError(f"{self.path}: truncated file: segment {past[0]} of level {index} ends at byte "
                                 f"{ends[past[0]]}, past the end of the file ({size} bytes)")

    @property
    def slide_id(self) -> str:
        return slide_id(self.path)

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((level.width, level.height) for level in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Mean of the width and height ratios to level 0 (OpenSlide's definition)."""
        w0, h0 = self.level_dimensions[0]
        return tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def compression(self) -> str:
        return self._levels[0].page.compression.name

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` = (w, h) pixels at `level`, top-left at level-0 `location` = (x, y)."""
        if not 0 <= level < len(self._levels):
            raise SlideError(f"{self.path}: level {level} requested; the slide has levels 0..{len(self._levels) - 1}")
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise SlideError(f"{self.path}: region size {size} must be positive")
        lvl = self._levels[level]
        w0, h0 = self.level_dimensions[0]
        x = int(math.floor(location[0] * lvl.width / w0))
        y = int(math.floor(location[1] * lvl.height / h0))
        out = np.full((height, width, lvl.samples), BACKGROUND, np.uint8)
        x0, x1 = max(x, 0), min(x + width, lvl.width)
        y0, y1 = max(y, 0), min(y + height, lvl.height)
        if x0 < x1 and y0 < y1:
            self._read_segments(lvl, level, out, x, y, x0, x1, y0, y1)
        return _to_rgb(out)

    def _read_segments(self, lvl: _TiffLevel, level: int, out: np.ndarray, x: int, y: int,
                       x0: int, x1: int, y0: int, y1: int) -> None:
        page = lvl.page
        rows = range(y0 // lvl.segment_h, (y1 - 1) // lvl.segment_h + 1)
        cols = range(x0 // lvl.segment_w, (x1 - 1) // lvl.segment_w + 1)
        indices = [plane * lvl.grid_y * lvl.grid_x + r * lvl.grid_x + c
                   for plane in range(lvl.planes) for r in rows for c in cols]
        with self._lock:
            handle = self._tiff.filehandle
            chunks = []
            for index in indices:
                handle.seek(page.dataoffsets[index])
                chunks.append(handle.read(page.databytecounts[index]))
        for index, data in zip(indices, chunks):
            try:
                segment, (plane, _, sy, sx, _), _ = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as error:  # a missing codec (JPEG without imagecodecs) or corrupt data
                raise SlideError(f"{self.path}: cannot decode segment {index} of level {level} "
                                 f"({page.compression.name}): {type(error).__name__}: {error}") from error
            if segment is None:
                raise SlideError(f"{self.path}: segment {index} of level {level} is empty (truncated file?)")
            segment = segment[0]  # (h, w, samples) of this segment
            sy0, sx0 = max(y0, sy), max(x0, sx)
            sy1, sx1 = min(y1, sy + segment.shape[0], lvl.height), min(x1, sx + segment.shape[1], lvl.width)
            if sy0 >= sy1 or sx0 >= sx1:
                continue
            block = segment[sy0 - sy:sy1 - sy, sx0 - sx:sx1 - sx]
            target = out[sy0 - y:sy1 - y, sx0 - x:sx1 - x]
            if lvl.planes > 1:
                target[..., plane] = block[..., 0]
            else:
                target[...] = block

    def close(self) -> None:
        self._tiff.close()

    def __enter__(self) -> "TiffSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OpenSlideSlide:
    """A vendor-format slide (.svs, .ndpi, .mrxs, ...) read with OpenSlide (`pip install openslide-python
    openslide-bin`); transparent (out-of-slide) pixels are composited on white glass."""

    def __init__(self, path: str):
        try:
            import openslide
        except ImportError as error:
            raise SlideError(f"{path}: reading this format needs OpenSlide: pip install openslide-python "
                             "openslide-bin") from error
        self.path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except Exception as error:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise SlideError(f"{path}: OpenSlide cannot open it ({type(error).__name__}: {error})") from error
        props = self._slide.properties
        try:
            self._mpp = float(props["openslide.mpp-x"]) if "openslide.mpp-x" in props else None
        except ValueError:
            self._mpp = None

    @property
    def slide_id(self) -> str:
        return slide_id(self.path)

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region(tuple(map(int, location)), int(level), tuple(map(int, size))))
        except Exception as error:  # OpenSlideError on corrupt tiles
            raise SlideError(f"{self.path}: OpenSlide read_region failed ({type(error).__name__}: {error})") from error
        return _to_rgb(rgba)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "OpenSlideSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_page(page):
    """A TiffPage (a TiffFrame, which shares its keyframe's tags, is loaded as a page)."""
    return page.aspage() if not hasattr(page, "decode") else page


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def open_slide(path: str, backend: str = "auto") -> Slide:
    """A slide by its extension: OpenSlide for vendor formats when it is installed (`backend="auto"`),
    else tifffile for TIFF-based files; `backend` "tifffile" / "openslide" forces one."""
    ext = os.path.splitext(path)[1].lower()
    if backend not in ("auto", "tifffile", "openslide"):
        raise ValueError(f"open_slide: backend must be 'auto', 'tifffile' or 'openslide', got {backend!r}")
    if backend == "openslide" or (backend == "auto" and ext in OPENSLIDE_EXTENSIONS and _openslide_available()):
        return OpenSlideSlide(path)
    if ext in TIFFFILE_EXTENSIONS or backend == "tifffile":
        return TiffSlide(path)
    if ext in OPENSLIDE_EXTENSIONS:
        raise SlideError(f"{path}: {ext} slides need OpenSlide: pip install openslide-python openslide-bin")
    raise SlideError(f"{path}: unknown slide extension {ext!r}; expected one of {', '.join(SLIDE_EXTENSIONS)}")


def list_slides(directory: str) -> list[str]:
    """The slide files directly in `directory` (by extension, sorted)."""
    if not os.path.isdir(directory):
        raise DataFileNotFoundError(f"{directory}: slide directory not found")
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.lower().endswith(SLIDE_EXTENSIONS) and os.path.isfile(os.path.join(directory, name)))


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, 1|3|4) uint8 -> (h, w, 3): gray repeated, RGBA composited on white."""
    if pixels.shape[-1] == 3:
        return pixels
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    alpha = pixels[..., 3:].astype(np.uint16)
    rgb = (pixels[..., :3].astype(np.uint16) * alpha + BACKGROUND * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)
