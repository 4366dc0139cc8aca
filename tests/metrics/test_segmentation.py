"""Dice and normalised surface Dice: hand-computed cases, empty masks, MONAI's border-voxel NSD."""
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

from medjax.metrics.segmentation import border, dice, normalized_surface_dice, per_class_scores, surface_distances


def voxels(shape, *points):
    m = np.zeros(shape, dtype=bool)
    for p in points:
        m[p] = True
    return m


def test_dice_hand_cases():
    gt = voxels((4, 4, 4), (0, 0, 0), (1, 0, 0))
    pred = voxels((4, 4, 4), (1, 0, 0))
    assert dice(pred, gt) == pytest.approx(2 / 3)
    assert dice(gt, gt) == 1.0
    assert dice(voxels((4, 4, 4), (3, 3, 3)), gt) == 0.0


def test_empty_masks():
    empty, some = np.zeros((3, 3, 3), bool), voxels((3, 3, 3), (1, 1, 1))
    assert math.isnan(dice(empty, empty)) and math.isnan(dice(some, empty))  # empty truth: skipped
    assert math.isnan(normalized_surface_dice(some, empty, 1.0))
    assert dice(empty, empty, ignore_empty=False) == 1.0 and dice(some, empty, ignore_empty=False) == 0.0
    assert normalized_surface_dice(empty, empty, 1.0, ignore_empty=False) == 1.0
    assert normalized_surface_dice(some, empty, 1.0, ignore_empty=False) == 0.0
    assert dice(empty, some) == 0.0 and normalized_surface_dice(empty, some, 5.0) == 0.0


def test_nsd_hand_cases_with_anisotropic_spacing():
    # two single voxels 2 apart along x at 1.5 mm: distance 3 mm both ways
    a, b = voxels((6, 3, 3), (1, 1, 1)), voxels((6, 3, 3), (3, 1, 1))
    d_ab, d_ba = surface_distances(a, b, spacing=(1.5, 1.0, 1.0))
    np.testing.assert_allclose(d_ab, [3.0])
    np.testing.assert_allclose(d_ba, [3.0])
    assert normalized_surface_dice(a, b, 2.9, spacing=(1.5, 1, 1)) == 0.0
    assert normalized_surface_dice(a, b, 3.0, spacing=(1.5, 1, 1)) == 1.0
    # truth = 2 voxels along z (2 mm), prediction = one of them: borders 2 + 1 voxels;
    # pred->truth 0; truth->pred 0 and 2 mm: at 1 mm tolerance (1 + 1) / 3
    gt = voxels((3, 3, 4), (1, 1, 1), (1, 1, 2))
    pred = voxels((3, 3, 4), (1, 1, 1))
    assert normalized_surface_dice(pred, gt, 1.0, spacing=(1, 1, 2)) == pytest.approx(2 / 3)
    assert normalized_surface_dice(pred, gt, 2.0, spacing=(1, 1, 2)) == 1.0


def test_border_is_mask_minus_its_6_connected_erosion():
    cube = np.zeros((7, 7, 7), bool)
    cube[1:6, 1:6, 1:6] = True
    assert border(cube).sum() == 5**3 - 3**3
    full = np.ones((3, 3, 3), bool)  # the array edge counts as outside
    assert border(full).sum() == 26


def test_nsd_equals_monai_border_voxel_surface_dice():
    rng = np.random.default_rng(0)
    one_hot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    for spacing, tol in (((1.5, 0.8, 2.0), 2.0), ((1.0, 1.0, 1.0), 1.0)):
        gt = ndimage.binary_dilation(rng.random((18, 16, 14)) > 0.995, iterations=3)
        pred = ndimage.binary_dilation(rng.random(gt.shape) > 0.995, iterations=2) | gt & (rng.random(gt.shape) > 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = compute_surface_dice(one_hot(pred), one_hot(gt), [tol], spacing=spacing, use_subvoxels=False)
        assert normalized_surface_dice(pred, gt, tol, spacing) == pytest.approx(ref[0, 0].item(), abs=1e-6)


def test_per_class_scores():
    pred = np.zeros((4, 4, 4, 3), bool)
    gt = np.zeros((4, 4, 4, 3), bool)
    gt[0, 0, 0, 0] = pred[0, 0, 0, 0] = True
    pred[1, 1, 1, 1] = True  # class 2: truth empty -> NaN
    gt[2, 2, 2, 2] = True  # class 3: prediction empty -> 0
    scores = per_class_scores(pred, gt, [1, 2, 3], spacing=(1, 1, 1), tolerance_mm={1: 1.0, 2: 1.0, 3: 2.0})
    assert scores[1] == (1.0, 1.0) and scores[3] == (0.0, 0.0)
    assert all(math.isnan(v) for v in scores[2])
