import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medjax.metrics.classification import (accuracy, contig_grade, contig_grade_targets, grade_to_ordinal, macro_auc, ordinal_to_grade,
                                           quadratic_weighted_kappa, roc_auc)


def test_roc_auc_hand_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # pairs (pos, neg): (0.5 vs 0.2) win, (0.5 vs 0.5) tie = 1/2, (0.3 vs 0.2) win, (0.3 vs 0.5) loss -> 2.5/4
    assert roc_auc([1, 0, 1, 0], [0.5, 0.2, 0.3, 0.5]) == 0.625
    assert roc_auc([0, 1, 0, 1], [3, 3, 3, 3]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_roc_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = np.round(rng.normal(size=200) + labels, 1)  # rounding makes ties
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_macro_auc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (100, 4))
    labels[:, 2] = 0  # one class only: skipped
    scores = rng.normal(size=(100, 4)) + labels
    expected = np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in (0, 1, 3)])
    assert macro_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="no column"):
        macro_auc(np.zeros((3, 2)), np.zeros((3, 2)))


def test_quadratic_weighted_kappa():
    rng = np.random.default_rng(2)
    for _ in range(5):
        y_true = rng.integers(0, 5, 300)
        y_pred = np.clip(y_true + rng.integers(-2, 3, 300), 0, 4)
        assert quadratic_weighted_kappa(y_true, y_pred, 5) == pytest.approx(
            cohen_kappa_score(y_true, y_pred, weights="quadratic"), abs=1e-12)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
    # Hand case, K = 3: O = [[0, 1], [1, 0]] on classes 0 and 2 -> sum(wO) = 2, E = 0.5 everywhere
    # on those classes -> sum(wE) = 1: kappa = 1 - 2 = -1.
    assert quadratic_weighted_kappa([0, 2], [2, 0], 3) == -1.0
    assert quadratic_weighted_kappa([3, 3], [3, 3], 5) == 1.0  # one class used by both raters
    with pytest.raises(ValueError, match=r"y_pred must be integers in \[0, 5\)"):
        quadratic_weighted_kappa([0, 1], [0, 5], 5)


def test_accuracy():
    assert accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_ordinal_round_trip():
    target = grade_to_ordinal(np.array([0, 1, 2, 3, 4]), 5)
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ordinal_to_grade(target), [0, 1, 2, 3, 4])
    probs = np.array([[0.9, 0.2, 0.8, 0.7], [0.6, 0.51, 0.5, 0.9], [0.4, 0.9, 0.9, 0.9]])
    np.testing.assert_array_equal(ordinal_to_grade(probs), [1, 2, 0])  # only leading positives count
    np.testing.assert_array_equal(ordinal_to_grade(probs, threshold=0.1), [4, 4, 4])
    with pytest.raises(ValueError, match=r"grades must be integers in \[0, 5\)"):
        grade_to_ordinal(np.array([5]), 5)


def test_contig_grade_on_borderline_logits():
    """ContIG's APTOS rule: grade = (sigmoid(logits) > 0.5).sum() - 1 over the 5 cumulative outputs; a logit of
    exactly 0 (sigmoid 0.5) is off, every output counts (not only the leading ones)."""
    import jax
    import jax.numpy as jnp

    logits = np.array([[3.0, 0.0, -1e-6, 2.0, -4.0],   # on, off (0.5 is not > 0.5), off, on, off -> 2 - 1 = 1
                       [1e-6, 1e-6, 1e-6, 1e-6, 1e-6],  # all just above 0.5 -> 4
                       [2.0, -2.0, 2.0, -2.0, 2.0],     # non-monotone: 3 on -> 2
                       [-1.0, -1.0, -1.0, -1.0, -1.0]])  # none on: ContIG's -1, clipped to grade 0 (our choice)
    sigmoid = 1 / (1 + np.exp(-logits))
    contig = (sigmoid > 0.5).sum(1) - 1  # the original's formula, line for line
    np.testing.assert_array_equal(contig, [1, 4, 2, -1])
    np.testing.assert_array_equal(contig_grade(sigmoid), np.maximum(contig, 0))
    np.testing.assert_array_equal(np.asarray(contig_grade(jax.nn.sigmoid(jnp.asarray(logits)))), [1, 4, 2, 0])
    np.testing.assert_array_equal(contig_grade_targets(np.array([0, 2, 4]), 5),
                                  [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(contig_grade(contig_grade_targets(np.arange(5), 5)), np.arange(5))
    # the training loss traces the same helper on the batch's jax labels
    traced = jax.jit(lambda g: contig_grade_targets(g, 5))(jnp.asarray([0, 2, 4], jnp.int32))
    np.testing.assert_array_equal(np.asarray(traced), contig_grade_targets(np.array([0, 2, 4]), 5))
