"""The EMA vector quantiser against hand computations: nearest code, the bias-corrected, Laplace-smoothed EMA
codebook update (VQ-VAE Appendix A.1 as ViSD-Boost's VectorQuantizerEMA), the commitment loss and the
straight-through gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.vq import VectorQuantizerEMA, ema_statistics, ema_update, nearest_codes, quantize

CODES = np.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
X = np.asarray([[0.9, 0.1], [0.1, 1.5], [-1.0, -1.0], [1.2, -0.1]], np.float32)


def test_nearest_code():
    np.testing.assert_array_equal(np.asarray(nearest_codes(jnp.asarray(X), jnp.asarray(CODES))), [1, 2, 0, 1])


def test_ema_update_by_hand():
    decay, eps = 0.5, 1e-5
    state = {"embeddings": jnp.asarray(CODES), "cluster_size": jnp.zeros(3), "code_sum": jnp.zeros((3, 2)),
             "count": jnp.zeros(())}
    weights = np.asarray([1, 1, 1, 0], np.float32)  # the last vector is padding
    counts, sums = ema_statistics(jnp.asarray(X), jnp.asarray([1, 2, 0, 1]), 3, jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(counts), [1, 1, 1])
    np.testing.assert_allclose(np.asarray(sums), [X[2], X[0], X[1]])
    new = ema_update(state, counts, sums, decay, eps)
    # step 1: hidden = 0.5 * value, corrected by 1 - 0.5 = 0.5 -> the batch values themselves
    n = 3.0
    smoothed = (np.ones(3) + eps) / (n + 3 * eps) * n
    np.testing.assert_allclose(np.asarray(new["embeddings"]), np.asarray([X[2], X[0], X[1]]) / smoothed[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), [0.5, 0.5, 0.5])
    # step 2 with every vector on code 1: hidden 0.25 + 0.5 * [0, 2, 0] ..., corrected by 1 - 0.25
    counts2, sums2 = jnp.asarray([0.0, 2.0, 0.0]), jnp.asarray([[0, 0], [2.0, 2.0], [0, 0]], jnp.float32)
    second = ema_update(new, counts2, sums2, decay, eps)
    size = (np.asarray([0.25, 0.25 + 1.0, 0.25]) / 0.75)
    total = size.sum()
    size = (size + eps) / (total + 3 * eps) * total
    code_sum = (0.5 * np.asarray([X[2], X[0], X[1]]) * 0.5 + 0.5 * np.asarray(sums2)) / 0.75
    np.testing.assert_allclose(np.asarray(second["embeddings"]), code_sum / size[:, None], rtol=1e-5)
    assert float(second["count"]) == 2.0


def test_module_updates_its_codebook_only_when_asked():
    quantizer = VectorQuantizerEMA(num_codes=3, dim=2, decay=0.5)
    variables = quantizer.init(jax.random.key(0), jnp.asarray(X))
    variables = {"codebook": dict(nn.unbox(variables["codebook"]), embeddings=jnp.asarray(CODES))}
    _, unchanged = quantizer.apply(variables, jnp.asarray(X), mutable=["codebook"])
    np.testing.assert_array_equal(np.asarray(unchanged["codebook"]["embeddings"]), CODES)
    (q, idx, _), updated = quantizer.apply(variables, jnp.asarray(X), jnp.ones(4), update=True, mutable=["codebook"])
    np.testing.assert_array_equal(np.asarray(idx), [1, 2, 0, 1])
    np.testing.assert_allclose(np.asarray(q), CODES[[1, 2, 0, 1]], rtol=1e-6)  # forward: the old codes
    n = 4.0
    size = (np.asarray([1.0, 2.0, 1.0]) + 1e-5) / (n + 3e-5) * n
    want = np.asarray([X[2], X[0] + X[3], X[1]]) / size[:, None]
    np.testing.assert_allclose(np.asarray(updated["codebook"]["embeddings"]), want, rtol=1e-5)


def test_straight_through_gradient_and_commitment():
    x, codes, beta = jnp.asarray(X), jnp.asarray(CODES), 0.25
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    upstream = jnp.asarray(np.random.default_rng(0).normal(size=X.shape), jnp.float32)
    # straight through: d(sum(upstream * q))/dx = upstream
    grad = jax.grad(lambda v: jnp.sum(upstream * quantize(v, codes, weights, beta)[0]))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(upstream), rtol=1e-6)
    nearest = CODES[[1, 2, 0, 1]]
    loss = float(quantize(x, codes, weights, beta)[2])
    w = np.asarray(weights)
    np.testing.assert_allclose(loss, beta * np.sum(((X - nearest) ** 2).mean(-1) * w) / w.sum(), rtol=1e-6)
    grad = jax.grad(lambda v: quantize(v, codes, weights, beta)[2])(x)  # beta * 2 (x - e) / (D * valid)
    np.testing.assert_allclose(np.asarray(grad), beta * 2 * (X - nearest) * w[:, None] / (2 * w.sum()), rtol=1e-5)
    no_st = jax.grad(lambda v: jnp.sum(upstream * quantize(v, codes, straight_through=False)[0]))(x)
    np.testing.assert_array_equal(np.asarray(no_st), 0.0)
