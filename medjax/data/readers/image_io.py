"""One image reader for every model family: any file PIL opens -> RGB uint8 (H, W, 3).

`read_image(path)` (and `decode(path_or_bytes, name)` for encoded bytes, e.g. an Arrow cell, or for
messages opening with a caller's "file: line N" instead of the path):
1. EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so a camera JPEG stored sideways
   comes out as it is displayed.
2. Modes become 8-bit RGB:
   - "RGB": as stored. "L" (gray): repeated over the 3 channels. "1" (bilevel): 0 / 255, repeated.
   - 16-bit gray ("I;16", "I;16L", "I;16B", "I;16N") and 32-bit integer "I" (how some readers hand a
     16-bit image over): value * 255 / 65535 rounded to nearest (= round(value / 257); 65535 is odd so
     there are no ties), i.e. the full 16-bit range maps to the full 8-bit range, as the PNG standard
     says 16-bit samples are scaled (a `convert("RGB")` instead clips everything above 255 to white).
     An "I" image with values outside [0, 65535] has no known bit depth and is an error.
   - 16-bit-per-channel colour PNGs: Pillow decodes them to "RGB" / "RGBA" keeping the high byte,
     floor(value / 256), which is within 1 of round(value / 257); they are used as decoded.
   - Alpha ("RGBA", "LA", "PA", "RGBa", "La", and "P" with a transparency entry): the alpha channel is
     dropped and each pixel keeps its stored colour (Pillow's `convert("RGB")`, OpenCV's `imread`
     and torchvision's `ImageFolder` do the same, so features match models trained with them); images
     are not composited on white. Premultiplied "RGBa"/"La" are un-premultiplied first.
   - "P" (palette): the palette colours. "CMYK", "YCbCr", "LAB", "HSV": Pillow's conversion to RGB.
   - 32-bit float "F" has no defined 8-bit scale and is an error.
Every failure is a `DataError` whose message starts with the file name.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from medjax.data.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """uint8 of round(value * 255 / 65535) for integer values in [0, 65535]."""
    values = np.asarray(values).astype(np.uint32)
    return ((values + 128) // 257).astype(np.uint8)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{name}: 32-bit integer image with values in [{values.min()}, {values.max()}], outside "
                            "the 16-bit range [0, 65535]; its bit depth is unknown, convert it to 8 or 16 bits")
        gray = scale_16_to_8(values)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise DataError(f"{name}: 32-bit float image (mode F) has no defined 8-bit scale; save it as an 8- or "
                        "16-bit integer image")
    if mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:  # drop alpha: keep the stored colour (module docstring)
        im = im.convert("RGBA").convert("RGB") if im.mode != "LA" else im.convert("L").convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise DataError(f"{name}: image mode {mode!r} cannot be converted to RGB ({e})") from e


def decode(source: str | bytes, name: str) -> np.ndarray:
    """`read_image` of a file path or of encoded bytes (e.g. an Arrow cell); messages open with `name`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not os.path.isfile(source):
        raise DataError(f"{name}: image file {source} not found")
    try:
        with Image.open(source) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im, name)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        raise DataError(f"{name} is not a readable image ({type(e).__name__}: {e})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{name}: decoded to shape {rgb.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(rgb)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as RGB uint8 (H, W, 3), EXIF-oriented, 16-bit scaled (module docstring)."""
    path = os.fspath(path)
    return decode(path, path)
