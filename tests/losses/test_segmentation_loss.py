"""Partial-label BCE + Dice (medjax.losses.segmentation): value against a numpy hand computation, and
unlabelled (sample, class) pairs get exactly zero gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses.segmentation import partial_label_bce_dice, per_class_bce_dice


def _case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(2, 3, 4, 2, 5)).astype(np.float32)
    logits[0, 0, 0, 0, 1] = 60.0  # saturated logits stay finite
    logits[1, 0, 0, 0, 4] = -60.0
    labels = (rng.random(logits.shape) < 0.4).astype(np.uint8)
    labels[1, ..., 2] = 0  # a labelled class absent from the crop
    mask = np.array([[True, False, True, False, True], [False, True, True, True, False]])
    return logits, labels, mask


def _hand(logits, labels, mask, smooth=1.0):
    """The module docstring's formulas, one (sample, class) pair at a time in float64."""
    bces, dices = [], []
    for b in range(logits.shape[0]):
        for c in range(logits.shape[-1]):
            if not mask[b, c]:
                continue
            x, t = logits[b, ..., c].astype(np.float64).ravel(), labels[b, ..., c].astype(np.float64).ravel()
            p = 1.0 / (1.0 + np.exp(-x))
            bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))  # -t log p - (1-t) log(1-p)
            bces.append(bce.mean())
            dices.append(1.0 - 2.0 * np.sum(p * t) / (np.sum(p) + np.sum(t) + smooth))
    return np.mean(bces) + np.mean(dices), np.mean(bces), np.mean(dices)


def _hand_present_dice(logits, labels, mask):
    """Mean Dice loss over the labelled pairs whose class has a voxel in the crop."""
    values = []
    for b, c in zip(*np.nonzero(mask)):
        if labels[b, ..., c].any():
            p = 1.0 / (1.0 + np.exp(-logits[b, ..., c].astype(np.float64)))
            t = labels[b, ..., c].astype(np.float64)
            values.append(1.0 - 2.0 * np.sum(p * t) / (np.sum(p) + np.sum(t) + 1.0))
    return np.mean(values), len(values)


def test_value_matches_hand_computation():
    logits, labels, mask = _case()
    loss, metrics = jax.jit(partial_label_bce_dice)(logits, labels, mask)
    want, want_bce, want_dice = _hand(logits, labels, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bce"]), want_bce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["dice_loss"]), want_dice, rtol=1e-5)
    assert float(metrics["labelled_pairs"]) == mask.sum() == 6
    # the logged Dice over the classes in the crop leaves out labelled-but-absent class 2 of sample 1
    want_present, present = _hand_present_dice(logits, labels, mask)
    assert float(metrics["present_pairs"]) == present == 5
    np.testing.assert_allclose(float(metrics["dice_loss_present"]), want_present, rtol=1e-5)
    # weights and smoothing
    loss2, _ = partial_label_bce_dice(logits, labels, mask, bce_weight=0.5, dice_weight=2.0, smooth=0.0)
    _, bce0, dice0 = _hand(logits, labels, mask, smooth=0.0)
    np.testing.assert_allclose(float(loss2), 0.5 * bce0 + 2.0 * dice0, rtol=1e-5)


def test_unlabelled_classes_get_exactly_zero_gradient():
    logits, labels, mask = _case(1)
    grad = jax.jit(jax.grad(lambda x: partial_label_bce_dice(x, labels, mask)[0]))(jnp.asarray(logits))
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()
    for b in range(2):
        for c in range(5):
            g = grad[b, ..., c]
            if mask[b, c]:
                assert np.abs(g).sum() > 0, (b, c)
            else:
                assert np.all(g == 0.0), (b, c)  # exactly zero, not small
    # changing an unlabelled channel's logits or labels changes nothing
    other_logits = np.where(mask[:, None, None, None, :], logits, 7.0).astype(np.float32)
    other_labels = labels.copy()
    other_labels[0, ..., 1] = 1
    np.testing.assert_array_equal(np.asarray(partial_label_bce_dice(other_logits, other_labels, mask)[0]),
                                  np.asarray(partial_label_bce_dice(logits, labels, mask)[0]))


def test_no_labelled_pair_gives_zero_loss_and_gradient():
    logits, labels, _ = _case(2)
    none = np.zeros((2, 5), bool)
    loss, grad = jax.value_and_grad(lambda x: partial_label_bce_dice(x, labels, none)[0])(jnp.asarray(logits))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_per_class_terms_and_empty_ground_truth():
    logits = np.zeros((1, 2, 2, 2, 2), np.float32)  # p = 0.5 everywhere
    labels = np.zeros_like(logits, dtype=np.uint8)
    labels[0, 0, :, :, 0] = 1  # class 0: 4 of 8 voxels; class 1: empty
    bce, dice = per_class_bce_dice(logits, labels)
    np.testing.assert_allclose(np.asarray(bce), [[np.log(2.0), np.log(2.0)]], rtol=1e-6)
    # class 0: 1 - 2 * (4 * 0.5) / (4 + 4 + 1); class 1 (empty): 1 - 0 / (4 + 0 + 1) = 1
    np.testing.assert_allclose(np.asarray(dice), [[1 - 4.0 / 9.0, 1.0]], rtol=1e-6)


def test_shape_errors_name_the_inputs():
    logits, labels, mask = _case()
    with pytest.raises(ValueError, match="label_mask must be"):
        partial_label_bce_dice(logits, labels, mask[:, :3])
    with pytest.raises(ValueError, match="logits .* and labels"):
        partial_label_bce_dice(logits, labels[..., :3], mask)
