"""MLM cross-entropy over the masked positions only, and ITM pairing/loss (PTUnifier Sec. 3.4)."""
import math

import jax
import numpy as np
import pytest

from medjax.losses.itm import itm_accuracy, itm_loss, itm_pairs
from medjax.losses.mlm import IGNORE_INDEX, mlm_accuracy, mlm_loss


def test_mlm_loss_counts_only_masked_positions():
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0]]], np.float32)
    labels = np.array([[0, IGNORE_INDEX, 2]])
    nll_0 = -(2.0 - math.log(math.exp(2.0) + 2))  # label 0 at position 0
    nll_2 = math.log(3.0)  # uniform logits at position 2
    np.testing.assert_allclose(float(mlm_loss(logits, labels)), (nll_0 + nll_2) / 2, rtol=1e-6)
    assert float(mlm_accuracy(logits, labels)) == 0.5  # position 0 right; position 2's argmax is 0 (tie), not 2
    assert float(mlm_loss(logits, np.full((1, 3), IGNORE_INDEX))) == 0.0  # nothing masked
    with pytest.raises(ValueError, match="labels"):
        mlm_loss(logits, labels[:, :2])


def test_itm_pairs_half_positive_and_negatives_from_other_samples():
    batch = 10
    partners_seen = np.zeros((batch, batch), int)
    for seed in range(200):
        labels, partner = map(np.asarray, itm_pairs(jax.random.PRNGKey(seed), batch))
        assert labels.sum() == batch // 2  # floor(B/2) positives, as the original
        idx = np.arange(batch)
        assert np.all(partner[labels == 1] == idx[labels == 1])
        assert np.all(partner[labels == 0] != idx[labels == 0]) and partner.min() >= 0 and partner.max() < batch
        partners_seen[idx[labels == 0], partner[labels == 0]] += 1
    # Uniform over the other samples: every (i, j != i) pair drawn, roughly 200 * 0.5 / 9 ~ 11 times.
    off_diagonal = partners_seen[~np.eye(batch, dtype=bool)]
    assert off_diagonal.min() > 0 and off_diagonal.max() < 30
    with pytest.raises(ValueError, match="at least 2"):
        itm_pairs(jax.random.PRNGKey(0), 1)


def test_itm_loss_is_two_way_cross_entropy():
    logits = np.array([[0.0, 2.0], [1.0, -1.0], [0.0, 0.0]], np.float32)
    labels = np.array([1, 1, 0])
    expected = np.mean([math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0)), math.log(2.0)])
    np.testing.assert_allclose(float(itm_loss(logits, labels)), expected, rtol=1e-6)
    assert abs(float(itm_accuracy(logits, labels)) - 2 / 3) < 1e-6
