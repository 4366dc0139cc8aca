"""Tiling previews as CLAM's `create_patches_fp.py --seg --stitch` writes them (Lu et al., Nat. Biomed. Eng. 2021):

- `masks/<slide_id>.png`: the segmentation thumbnail with the kept tissue contours in green and their kept holes in
  blue (CLAM's `visWSI`, drawn with PIL at the thumbnail's scale, 1-px lines);
- `stitches/<slide_id>.png`: the kept tiles pasted on a black canvas at the thumbnail's scale (CLAM's
  `StitchCoords`; from the thumbnail's own pixels, so no slide region is read again).
PNG, not CLAM's JPEG (our choice: exact pixels for a check by eye or by test).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from medjax.data.tiling.tissue import TissueContours

TISSUE_COLOUR, HOLE_COLOUR = (0, 255, 0), (0, 0, 255)


def _to_thumbnail(contour: np.ndarray, downsample: tuple[float, float]) -> list[tuple[float, float]]:
    points = np.asarray(contour, np.float64).reshape(-1, 2) / np.asarray(downsample)
    return [tuple(p) for p in points]


def mask_preview(tissue: TissueContours) -> Image.Image:
    """The thumbnail with the contours (green) and holes (blue) drawn on it."""
    image = Image.fromarray(np.ascontiguousarray(tissue.thumbnail[..., :3]))
    draw = ImageDraw.Draw(image)
    for contour, holes in zip(tissue.contours, tissue.holes):
        for polygon, colour in [(contour, TISSUE_COLOUR)] + [(hole, HOLE_COLOUR) for hole in holes]:
            points = _to_thumbnail(polygon, tissue.downsample)
            draw.line(points + points[:1], fill=colour, width=1)
    return image


def stitch_preview(tissue: TissueContours, coords: np.ndarray, tile: int) -> Image.Image:
    """Black canvas of the thumbnail's size with the thumbnail's pixels under each kept tile (level-0 corner `coords`,
    `tile` level-0 pixels square)."""
    thumbnail = np.asarray(tissue.thumbnail[..., :3])
    canvas = np.zeros_like(thumbnail)
    dx, dy = tissue.downsample
    h, w = thumbnail.shape[:2]
    for x, y in np.asarray(coords).reshape(-1, 2):
        x0, y0 = int(np.floor(x / dx)), int(np.floor(y / dy))
        x1, y1 = min(int(np.ceil((x + tile) / dx)), w), min(int(np.ceil((y + tile) / dy)), h)
        canvas[y0:y1, x0:x1] = thumbnail[y0:y1, x0:x1]
    return Image.fromarray(canvas)


def save_previews(out_dir: str, slide_id: str, tissue: TissueContours, coords: np.ndarray, tile: int, *,
                  mask: bool, stitch: bool) -> list[str]:
    """Write the previews asked for under `out_dir`; their paths."""
    written = []
    for wanted, folder, make in ((mask, "masks", lambda: mask_preview(tissue)),
                                 (stitch, "stitches", lambda: stitch_preview(tissue, coords, tile))):
        if not wanted:
            continue
        path = os.path.join(out_dir, folder, f"{slide_id}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make().save(path)
        written.append(path)
    return written
