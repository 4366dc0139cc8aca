"""DINOv2's drop_add_residual_stochastic_depth (`dinov2/layers/block.py`): only the kept subset of the batch goes
through a residual branch, the residuals scaled by b / subset -- the same expectation as DropPath (x + f(x)), at
(1 - rate) of the branch's FLOPs; a block at rate 0 (or in eval) is the plain block."""
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.transformer import TransformerBlock, drop_add_residual_stochastic_depth

B, N, D = 10, 5, 16


def residual_fn(x):
    return jnp.tanh(x @ jnp.linspace(-1.0, 1.0, D * D).reshape(D, D))  # per sample


def test_kept_rows_get_the_scaled_residual_and_the_expectation_is_x_plus_f():
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    rate = 0.3
    keep = int(B * (1 - rate))  # 7
    draw = jax.jit(jax.vmap(lambda key: drop_add_residual_stochastic_depth(x, residual_fn, rate, key)))
    outs = np.asarray(draw(jax.random.split(jax.random.key(1), 4000)))
    f = np.asarray(residual_fn(x))
    kept = np.abs(outs - np.asarray(x)[None]).max(axis=(2, 3)) > 0  # (draws, B)
    assert (kept.sum(axis=1) == keep).all()
    # each kept row is x + (b / keep) f(x), each other row x itself
    expected = np.where(kept[..., None, None], np.asarray(x)[None] + (B / keep) * f[None], np.asarray(x)[None])
    np.testing.assert_allclose(outs, expected, atol=1e-5)
    # every sample is kept with probability keep / b, so the mean over draws is x + f(x)
    np.testing.assert_allclose(kept.mean(axis=0), keep / B, atol=0.03)
    np.testing.assert_allclose(outs.mean(axis=0), np.asarray(x + f), atol=0.06 * np.abs(f).max())


def _block(rate, drop_add):
    return TransformerBlock(num_heads=2, drop_path=rate, layerscale_init=0.5, drop_add_residual=drop_add)


def test_rate_zero_and_eval_are_the_plain_block():
    x = jax.random.normal(jax.random.key(2), (B, N, D))
    params = _block(0.0, True).init(jax.random.key(3), x)
    plain = _block(0.0, False).apply(params, x)
    np.testing.assert_array_equal(_block(0.0, True).apply(params, x, train=True, rngs={"dropout": jax.random.key(4)}),
                                  plain)
    np.testing.assert_array_equal(_block(0.3, True).apply(params, x, train=False), plain)
    trained = _block(0.3, True).apply(params, x, train=True, rngs={"dropout": jax.random.key(4)})
    assert np.isfinite(trained).all() and np.abs(trained - plain).max() > 0


def test_subset_saves_the_dropped_fraction_of_block_flops():
    x = jnp.zeros((B, N, D))
    params = _block(0.3, True).init(jax.random.key(3), x)

    def flops(drop_add):
        fn = jax.jit(lambda p, x, key: _block(0.3, drop_add).apply(p, x, train=True, rngs={"dropout": key}))
        cost = fn.lower(params, x, jax.random.key(0)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"]

    ratio = flops(True) / flops(False)
    assert 0.6 < ratio < 0.8, ratio  # 7 of 10 samples through each branch (DINOv2: ~30% fewer at rate 0.3)
