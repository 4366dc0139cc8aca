"""Segmentation metrics of the CLIP-Driven Universal Model's tables (Liu et al., ICCV 2023, arXiv
2301.00785, Tables 1-3): Dice similarity coefficient and normalised surface Dice (NSD, the Medical
Segmentation Decathlon's second metric; Nikolov et al., arXiv 1809.04430).

- Dice = 2 |P n G| / (|P| + |G|) on bool masks.
- NSD at tolerance tau (mm) = (|{p in dP : d(p, dG) <= tau}| + |{g in dG : d(g, dP) <= tau}|) /
  (|dP| + |dG|), where dP, dG are the border voxels of the masks (a mask voxel with a background
  6-neighbour; outside the volume counts as background: `mask ^ binary_erosion(mask)`) and d is the
  Euclidean distance between voxel centres in mm (voxel `spacing`), read from
  `scipy.ndimage.distance_transform_edt(~border, sampling=spacing)` as in DeepMind's
  surface-distance package. This counts border voxels, as MONAI's `compute_surface_dice(...,
  use_subvoxels=False)` (its default), equal to it; DeepMind's package instead weights surface
  elements between voxel corners by their area (MONAI `use_subvoxels=True`), which is not done here.

Empty masks, as the field handles them (documented choice, `ignore_empty`):
- ground truth empty: NaN with `ignore_empty=True` (the default), so the case is skipped in means,
  as the original's `test.py` (organs with an empty label are not scored) and MONAI's
  `DiceMetric(ignore_empty=True)`; with `ignore_empty=False`: 1.0 when the prediction is empty too,
  else 0.0 (Dice and NSD alike);
- ground truth present, prediction empty: 0.0 for Dice and NSD.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must have one shape")
    return pred, gt


def _empty_score(pred: np.ndarray, ignore_empty: bool) -> float:
    if ignore_empty:
        return float("nan")
    return 0.0 if pred.any() else 1.0


def dice(pred: np.ndarray, gt: np.ndarray, *, ignore_empty: bool = True) -> float:
    """Dice = 2 |P n G| / (|P| + |G|) of two bool masks (empty masks: module docstring)."""
    pred, gt = _pair(pred, gt)
    gt_size = int(np.count_nonzero(gt))
    if gt_size == 0:
        return _empty_score(pred, ignore_empty)
    intersection = int(np.count_nonzero(pred & gt))
    return 2.0 * intersection / (int(np.count_nonzero(pred)) + gt_size)


def border(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a 6-neighbour outside it (outside the array counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask)


def _spacing(spacing: Sequence[float] | float, ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)))
    if not all(s > 0 and np.isfinite(s) for s in values):
        raise ValueError(f"spacing must be positive (mm per voxel), got {spacing}")
    return values


def surface_distances(pred: np.ndarray, gt: np.ndarray,
                      spacing: Sequence[float] | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(distances in mm from each border voxel of `pred` to the border of `gt`, and from `gt`'s
    border to `pred`'s), both non-empty masks; computed in the union's bounding box (margin 1)."""
    pred, gt = _pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks")
    sampling = _spacing(spacing, pred.ndim)
    union = pred | gt
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
    pred_border, gt_border = border(pred[box]), border(gt[box])
    to_gt = ndimage.distance_transform_edt(~gt_border, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sampling)
    return to_gt[pred_border], to_pred[gt_border]


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, tolerance_mm: float,
                            spacing: Sequence[float] | float = 1.0, *, ignore_empty: bool = True) -> float:
    """NSD of two bool masks at `tolerance_mm` (module docstring; empty masks likewise)."""
    pred, gt = _pair(pred, gt)
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not gt.any():
        return _empty_score(pred, ignore_empty)
    if not pred.any():
        return 0.0
    pred_to_gt, gt_to_pred = surface_distances(pred, gt, spacing)
    good = np.count_nonzero(pred_to_gt <= tolerance_mm) + np.count_nonzero(gt_to_pred <= tolerance_mm)
    return float(good / (pred_to_gt.size + gt_to_pred.size))


def per_class_scores(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int], *,
                     spacing: Sequence[float] | float, tolerance_mm: float | dict[int, float],
                     ignore_empty: bool = True) -> dict[int, tuple[float, float]]:
    """{class: (Dice, NSD)} for 1-based `classes` of (X, Y, Z, C) channel masks (channel c - 1 is
    class c); `tolerance_mm` one value or one per class."""
    pred, gt = _pair(pred, gt)
    if pred.ndim != 4:
        raise ValueError(f"per_class_scores needs (X, Y, Z, C) masks, got shape {pred.shape}")
    scores = {}
    for c in classes:
        if not 1 <= c <= pred.shape[-1]:
            raise ValueError(f"class {c} outside the {pred.shape[-1]} channels")
        tol = tolerance_mm[c] if isinstance(tolerance_mm, dict) else tolerance_mm
        p, g = pred[..., c - 1], gt[..., c - 1]
        scores[c] = (dice(p, g, ignore_empty=ignore_empty),
                     normalized_surface_dice(p, g, tol, spacing, ignore_empty=ignore_empty))
    return scores


def pooled_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice pooled over a whole split, 2 sum(p g) / (sum p + sum g), of bool or [0, 1] arrays of one shape:
    with soft probabilities `pred` it is ContIG's PALM `dice(y, y_pred)` (HealthML/ContIG
    `palm_myopia_segmentation.py`, over every pixel of every image and class); NaN when both sums are 0."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must have one shape")
    total = pred.sum() + gt.sum()
    return float(2.0 * (pred * gt).sum() / total) if total > 0 else float("nan")
