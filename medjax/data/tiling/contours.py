"""OpenCV's contour geometry in numpy, as CLAM's tiling uses it (Lu et al., Nat. Biomed. Eng. 2021,
`wsi_core/WholeSlideImage.py`): `cv2.findContours(mask, RETR_CCOMP, CHAIN_APPROX_NONE)`, `cv2.contourArea`,
`cv2.boundingRect` and `cv2.pointPolygonTest(contour, point, False)` on integer contours.

- Borders are traced as Suzuki & Abe (CVGIP 1985) do: an outer border per 8-connected foreground component,
  from its first pixel in raster order; a hole border per 4-connected background component it encloses, from the
  foreground pixel left of the hole's first pixel; each a closed chain of 8-neighbouring border pixels (x, y)
  (Moore-neighbour following, stopped when the first move repeats), every pixel of the chain a vertex
  (CHAIN_APPROX_NONE). An isolated pixel is a one-vertex contour.
- `contour_area`: the shoelace area of the vertex chain (|sum| / 2), as `cv2.contourArea(oriented=False)`.
- `point_polygon_test`: OpenCV's integer algorithm: 0 on an edge, else +1 / -1 by the parity of crossings of a ray
  towards +x (half-open in y), edges taken in the chain's order including the closing one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Neighbours clockwise on screen (y down): E, SE, S, SW, W, NW, N, NE.
_DX = np.array([1, 1, 0, -1, -1, -1, 0, 1])
_DY = np.array([0, 1, 1, 1, 0, -1, -1, -1])
_DIRECTION = {(int(dx), int(dy)): k for k, (dx, dy) in enumerate(zip(_DX, _DY))}
_EIGHT = np.ones((3, 3), bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class Component:
    """One outer border (K, 2) int64 (x, y) and the borders of the holes it encloses (RETR_CCOMP's two levels)."""

    outer: np.ndarray
    holes: tuple[np.ndarray, ...]


def trace_border(padded: np.ndarray, start: tuple[int, int], back: tuple[int, int]) -> np.ndarray:
    """The border chain through foreground pixel `start` (x, y) of a zero-padded bool image, beginning the
    clockwise neighbour scan after the background pixel `back`; vertices in unpadded coordinates."""
    x, y = start
    d = _DIRECTION[(back[0] - x, back[1] - y)]
    chain = [(x, y)]
    first_move = None
    while True:
        for step in range(1, 9):
            k = (d + step) % 8
            nx, ny = x + _DX[k], y + _DY[k]
            if padded[ny, nx]:
                break
        else:
            return np.array([(x - 1, y - 1)], np.int64)  # an isolated pixel
        # the last background neighbour scanned becomes the backtrack of the next pixel
        prev = (d + step - 1) % 8
        bx, by = x + _DX[prev], y + _DY[prev]
        move = ((x, y), (int(nx), int(ny)))
        if first_move is None:
            first_move = move
        elif move == first_move:
            chain.pop()  # back at the start, about to repeat the first move
            return np.array(chain, np.int64) - 1
        x, y = int(nx), int(ny)
        d = _DIRECTION[(int(bx) - x, int(by) - y)]
        chain.append((x, y))


def find_components(mask: np.ndarray) -> list[Component]:
    """Every foreground component's outer border with its holes' borders (RETR_CCOMP, CHAIN_APPROX_NONE), in raster
    order of the components' first pixels."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    padded = np.pad(mask, 1)
    fg_labels, n_fg = ndimage.label(mask, structure=_EIGHT)
    bg_labels, n_bg = ndimage.label(~mask, structure=_FOUR)
    flat_fg = fg_labels.ravel()
    present, first = np.unique(flat_fg, return_index=True)
    starts = {int(label): int(index) for label, index in zip(present, first) if label > 0}
    on_border = np.zeros(n_bg + 1, bool)
    on_border[np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])] = True
    holes_of: dict[int, list[np.ndarray]] = {label: [] for label in starts}
    bg_present, bg_first = np.unique(bg_labels.ravel(), return_index=True)
    for label, index in zip(bg_present, bg_first):
        if label == 0 or on_border[label]:
            continue
        hy, hx = divmod(int(index), w)
        owner = int(fg_labels[hy - 1, hx])  # the pixel above a hole's first pixel is its enclosing component
        holes_of[owner].append(trace_border(padded, (hx, hy + 1), (hx + 1, hy + 1)))
    components = []
    for label in sorted(starts, key=starts.get):
        sy, sx = divmod(starts[label], w)
        outer = trace_border(padded, (sx + 1, sy + 1), (sx, sy + 1))
        components.append(Component(outer, tuple(holes_of[label])))
    return components


def contour_area(contour: np.ndarray) -> float:
    """`cv2.contourArea(contour)`: |shoelace sum| / 2 of the closed vertex chain."""
    c = np.asarray(contour, np.float64).reshape(-1, 2)
    if len(c) < 3:
        return 0.0
    x, y = c[:, 0], c[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def bounding_rect(contour: np.ndarray) -> tuple[int, int, int, int]:
    """`cv2.boundingRect`: (x, y, w, h) with w = max x - min x + 1."""
    c = np.asarray(contour).reshape(-1, 2)
    x0, y0 = c.min(axis=0)
    x1, y1 = c.max(axis=0)
    return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)


def point_polygon_test(contour: np.ndarray, points: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """`cv2.pointPolygonTest(contour, p, False)` for integer points (N, 2): +1 inside, -1 outside, 0 on an edge."""
    c = np.asarray(contour, np.int64).reshape(-1, 2)
    points = np.asarray(points, np.int64).reshape(-1, 2)
    v0, v = np.roll(c, 1, axis=0), c  # OpenCV's edges: (cnt[i-1], cnt[i]), the first closing the chain
    out = np.empty(len(points), np.int8)
    rows = max(1, chunk // max(len(c), 1))
    for start in range(0, len(points), rows):
        px = points[start:start + rows, 0:1]
        py = points[start:start + rows, 1:2]
        skip = ((v0[:, 1] <= py) & (v[:, 1] <= py)) | ((v0[:, 1] > py) & (v[:, 1] > py)) | \
               ((v0[:, 0] < px) & (v[:, 0] < px))
        on_skipped = skip & (py == v[:, 1]) & ((px == v[:, 0]) | ((py == v0[:, 1]) & (
            ((v0[:, 0] <= px) & (px <= v[:, 0])) | ((v[:, 0] <= px) & (px <= v0[:, 0])))))
        dist = (py - v0[:, 1]) * (v[:, 0] - v0[:, 0]) - (px - v0[:, 0]) * (v[:, 1] - v0[:, 1])
        dist = np.where(v[:, 1] < v0[:, 1], -dist, dist)
        on_edge = on_skipped.any(axis=1) | (~skip & (dist == 0)).any(axis=1)
        crossings = (~skip & (dist > 0)).sum(axis=1)
        out[start:start + rows] = np.where(on_edge, 0, np.where(crossings % 2 == 1, 1, -1))
    return out
