"""Gated ABMIL (Ilse et al. 2018, UNI's slide classifier; CLAM's defaults): logical axes, masking, permutation invariance."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax.models.abmil import GatedABMIL, pad_bags
from medjax.tasks.uni_eval import uni_eval_config

MODEL = GatedABMIL(num_classes=2, hidden_dim=32, attention_dim=16, dropout=0.1)
D = 16


@pytest.fixture(scope="module")
def params():
    x = np.zeros((1, 8, D), np.float32)
    variables = MODEL.init(jax.random.key(0), x, np.ones((1, 8), bool))
    return variables["params"]


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda p, x, m: MODEL.apply({"params": p}, x, m, train=False))


def test_params_have_logical_axes(params):
    boxed = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.Partitioned) for v in boxed)
    assert params["fc"]["kernel"].names == ("embed", "mlp")
    assert nn.unbox(params)["attention_v"]["kernel"].shape == (32, 16)


def test_defaults_are_clams_gated_attention():
    """Issue #19: CLAM's Attn_Net_Gated, size "small" (FC 512, attention 256, dropout 0.25), in the model and the
    evaluation config; 384 (CLAM "big", UNI's Methods) is a setting."""
    model = GatedABMIL(num_classes=2)
    assert (model.hidden_dim, model.attention_dim, model.dropout) == (512, 256, 0.25)
    abmil = uni_eval_config().abmil
    assert (abmil.hidden_dim, abmil.attention_dim, abmil.dropout) == (512, 256, 0.25)


def test_padding_gets_zero_attention_and_changes_nothing(params, apply):
    rng = np.random.default_rng(0)
    bag = rng.normal(size=(5, D)).astype(np.float32)
    feats, mask = pad_bags([bag], length=8)
    logits, attention = apply(params, feats, mask)
    assert attention.shape == (1, 8)
    np.testing.assert_array_equal(np.asarray(attention)[0, 5:], 0.0)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6)
    garbage = feats.copy()
    garbage[0, 5:] = 100.0 * rng.normal(size=(3, D))  # padding content must not matter
    logits2, attention2 = apply(params, garbage, mask)
    np.testing.assert_allclose(logits2, logits, atol=1e-6)
    np.testing.assert_allclose(attention2, attention, atol=1e-7)
    empty_logits, empty_attention = apply(params, feats, np.zeros((1, 8), bool))
    assert np.isfinite(np.asarray(empty_logits)).all() and float(np.abs(empty_attention).sum()) == 0.0


def test_permutation_invariance(params, apply):
    rng = np.random.default_rng(1)
    bag = rng.normal(size=(8, D)).astype(np.float32)
    perm = rng.permutation(8)
    mask = np.ones((1, 8), bool)
    logits, attention = apply(params, bag[None], mask)
    logits_p, attention_p = apply(params, bag[perm][None], mask)
    np.testing.assert_allclose(logits_p, logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(attention_p)[0], np.asarray(attention)[0][perm], atol=1e-6)
