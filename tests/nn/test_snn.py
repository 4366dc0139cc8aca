"""Self-normalising network (Klambauer et al. 2017): alpha dropout statistics, init, layer math."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax.nn.snn import ALPHA_PRIME, SNN, AlphaDropout, SNNLayer


def test_alpha_prime_constant():
    assert ALPHA_PRIME == pytest.approx(-1.7580993408473766, rel=1e-15)


def test_alpha_dropout_preserves_mean_and_variance():
    x = jax.random.normal(jax.random.key(0), (1_000_000,))
    y = np.asarray(AlphaDropout(0.1).apply({}, x, train=True, rngs={"dropout": jax.random.key(1)}))
    assert abs(y.mean()) < 0.005
    assert abs(y.var() - 1.0) < 0.01
    rate = 0.1
    a = ((1 - rate) * (1 + rate * ALPHA_PRIME ** 2)) ** -0.5
    dropped_value = a * ALPHA_PRIME - a * rate * ALPHA_PRIME
    assert np.isclose(y, dropped_value, atol=1e-6).mean() == pytest.approx(rate, abs=0.002)
    kept = ~np.isclose(y, dropped_value, atol=1e-6)
    np.testing.assert_allclose(y[kept], a * np.asarray(x)[kept] - a * rate * ALPHA_PRIME, rtol=1e-5, atol=1e-6)


def test_alpha_dropout_is_identity_in_eval_and_depends_on_the_rng():
    x = jax.random.normal(jax.random.key(2), (64,))
    layer = AlphaDropout(0.3)
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, train=False)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(AlphaDropout(0.0).apply({}, x, train=True)), np.asarray(x))
    y1 = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(3)})
    y2 = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.array_equal(np.asarray(y1), np.asarray(y2))
    with pytest.raises(ValueError, match="snn.py AlphaDropout.rate"):
        AlphaDropout(1.0).apply({}, x, train=True, rngs={"dropout": jax.random.key(3)})


def test_snn_layer_is_selu_of_a_lecun_normal_dense():
    x = jax.random.normal(jax.random.key(5), (4, 300))
    variables = SNNLayer(200, 0.1).init(jax.random.key(6), x, train=False)
    kernel = np.asarray(nn.unbox(variables["params"]["dense"]["kernel"]))
    assert kernel.std() == pytest.approx(1 / np.sqrt(300), rel=0.05)  # LeCun normal: Var(w) = 1/fan_in
    bias = np.asarray(nn.unbox(variables["params"]["dense"]["bias"]))
    h = np.asarray(x) @ kernel + bias
    expected = 1.0507009873554805 * np.where(h > 0, h, 1.6732632423543772 * np.expm1(np.minimum(h, 0)))
    got = SNNLayer(200, 0.1).apply(variables, x, train=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    specs = nn.get_partition_spec(variables)["params"]["dense"]
    assert tuple(specs["kernel"]) == ("embed", "mlp") and tuple(specs["bias"]) == ("mlp",)


def test_snn_keeps_activations_normalised():
    x = jax.random.normal(jax.random.key(7), (2048, 256))
    snn = SNN([256, 256, 256], dropout_rate=0.1)
    variables = snn.init(jax.random.key(8), x, train=False)
    for train in (False, True):
        y = np.asarray(snn.apply(variables, x, train=train, rngs={"dropout": jax.random.key(9)}))
        assert y.shape == (2048, 256)
        assert abs(y.mean()) < 0.1, (train, y.mean())
        assert abs(y.var() - 1.0) < 0.15, (train, y.var())
    assert set(variables["params"]) == {"layer_0", "layer_1", "layer_2"}
