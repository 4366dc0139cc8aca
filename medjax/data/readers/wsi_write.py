"""Writing tiled pyramidal TIFF slides (the format medjax/data/readers/wsi.py reads): each level the rounded block mean
of level 0, resolution tags and an Aperio-style MPP description. Used by the WSI demo and the tests."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _block_sums(block: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """Sums of the fh x fw blocks tiling `block` (uint32), by adding contiguous slices (fast in numpy)."""
    bh, bw = block.shape[0] // fh, block.shape[1] // fw
    rows = block.reshape((bh, fh) + block.shape[1:])
    acc = rows[:, 0].astype(np.uint32)
    for i in range(1, fh):
        acc += rows[:, i]
    cols = acc.reshape((bh, bw, fw) + block.shape[2:])
    out = cols[:, :, 0].copy()
    for j in range(1, fw):
        out += cols[:, :, j]
    return out


def downsample_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor` x `factor` blocks of a uint8 (H, W[, C]) image, rounding half up; a partial
    block at the right / bottom edge averages the pixels it has."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    full_h, full_w = h // factor * factor, w // factor * factor
    sums = np.zeros((out_h, out_w) + image.shape[2:], np.uint32)
    counts = np.zeros((out_h, out_w), np.uint32)
    row_parts = ((slice(0, full_h // factor), slice(0, full_h)), (slice(full_h // factor, out_h), slice(full_h, h)))
    col_parts = ((slice(0, full_w // factor), slice(0, full_w)), (slice(full_w // factor, out_w), slice(full_w, w)))
    for rows, row_slice in row_parts:  # whole blocks, then the partial bottom / right edge
        for cols, col_slice in col_parts:
            block = image[row_slice, col_slice]
            if block.size == 0:
                continue
            bh, bw = -(-block.shape[0] // factor), -(-block.shape[1] // factor)
            fh, fw = block.shape[0] // bh, block.shape[1] // bw  # factor, or the partial edge's extent
            sums[rows, cols] = _block_sums(block, fh, fw)
            counts[rows, cols] = fh * fw
    counts = counts.reshape(counts.shape + (1,) * (image.ndim - 2))
    return ((2 * sums + counts) // (2 * counts)).astype(np.uint8)


def write_pyramidal_tiff(path: str, level0: np.ndarray, *, mpp: float | None, downsamples: Sequence[int] = (1, 4, 16),
                         tile: int = 256, compression: str | None = "zlib", compression_level: int | None = None,
                         description: str | None = None) -> None:
    """Write an RGB uint8 (H, W, 3) image as a tiled pyramidal TIFF, each level the block mean of level 0.

    `downsamples` (1 first, increasing integers) give the levels; `mpp` None writes no resolution (a
    slide without microns per pixel). `compression`: "zlib" (Adobe deflate, no extra package), "jpeg"
    (needs imagecodecs), "lzma", None; `compression_level` its level / JPEG quality (zlib 1 is 10x
    faster than the default 6 for 10% more bytes). The description defaults to an Aperio-style line
    with the MPP.
    """
    import tifffile

    if level0.dtype != np.uint8 or level0.ndim != 3 or level0.shape[2] != 3:
        raise ValueError(f"{path}: level0 must be uint8 (H, W, 3), got {level0.dtype} {level0.shape}")
    if list(downsamples)[:1] != [1] or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise ValueError(f"{path}: downsamples must start at 1 and increase, got {tuple(downsamples)}")
    if description is None:
        h, w = level0.shape[:2]
        description = f"medjax pyramidal TIFF {w}x{h}" + (f" |MPP = {mpp:.6g}" if mpp else "")
    options = dict(tile=(tile, tile), photometric="rgb", compression=compression, metadata=None)
    if compression_level is not None:
        options["compressionargs"] = {"level": compression_level}
    if mpp:
        pixels_per_cm = 1e4 / mpp
        options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
    try:
        with tifffile.TiffWriter(path, bigtiff=level0.nbytes > 2 ** 31) as writer:
            for index, factor in enumerate(downsamples):
                writer.write(downsample_mean(level0, factor), subfiletype=1 if index else 0,
                             description=description if index == 0 else None, **options)
    except KeyError as error:  # tifffile: "<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package"
        raise ValueError(f"{path}: compression {compression!r} is not available here ({error}); "
                         "use 'zlib' or pip install imagecodecs") from error
