"""Fixed 2D sine-cosine position embeddings as the MAE code (He et al., CVPR 2022; `util/pos_embed.py`
`get_2d_sincos_pos_embed`, itself from MoCo v3), which the MRM authors' encoder uses.

For a patch at row r, column c of a g x g grid and width D (D divisible by 4), with
omega_k = 1 / 10000^(k / (D/4)), k = 0 .. D/4 - 1:

    e[0      : D/4 ] = sin(c omega)     e[D/4  : D/2 ] = cos(c omega)      (MAE's "emb_h" half: grid[0]
    e[D/2    : 3D/4] = sin(r omega)     e[3D/4 : D   ] = cos(r omega)       of meshgrid(w, h) is the column)

Patches in row-major order; with `class_token` a zero row first.
"""
from __future__ import annotations

import numpy as np


def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), width): [sin(p omega), cos(p omega)], omega_k = 1 / 10000^(2k / width)."""
    if width % 2:
        raise ValueError(f"medjax/nn/sincos.py: width {width} must be even")
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(width: int, grid: int, *, class_token: bool = False) -> np.ndarray:
    """float32 ([1 +] grid * grid, width): the MAE table (module docstring)."""
    if width % 4:
        raise ValueError(f"medjax/nn/sincos.py: width {width} must be a multiple of 4 for 2D sin-cos embeddings")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([sincos_1d(width // 2, cols), sincos_1d(width // 2, rows)], axis=1)
    if class_token:
        table = np.concatenate([np.zeros((1, width)), table], axis=0)
    return table.astype(np.float32)
