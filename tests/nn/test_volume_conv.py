"""The CPU rewrites of 3x3x3 'same' convolutions (medjax.nn.volume_conv) against lax's 3D convolution:
values and gradients, the Winograd rounding error against float64, and which calls take which path."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.nn import volume_conv
from medjax.nn.volume_conv import (conv3x3x3_by_planes, conv3x3x3_by_taps, conv3x3x3_winograd_x, cpu_rewrite,
                                   volume_conv_general_dilated)

DN = ("NDHWC", "DHWIO", "NDHWC")
REWRITES = [conv3x3x3_by_planes, conv3x3x3_winograd_x, conv3x3x3_by_taps]


def _lax_conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN)


@pytest.mark.parametrize("rewrite", REWRITES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 3), (1, 9, 4, 5, 2)])  # X = 5, 9: not whole Winograd tiles
def test_rewrite_equals_lax_3d_convolution_forward_and_gradients(rewrite, shape):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (3, 3, 3, shape[-1], 4)) / np.sqrt(27 * shape[-1])
    cotangent = jax.random.normal(keys[2], shape[:-1] + (4,))

    def value_and_grads(fn):
        out, pullback = jax.vjp(fn, x, kernel)
        return out, pullback(cotangent)

    ref, (ref_dx, ref_dk) = jax.jit(lambda: value_and_grads(_lax_conv))()
    out, (dx, dk) = jax.jit(lambda: value_and_grads(rewrite))()
    assert out.shape == shape[:-1] + (4,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=2e-4)
    # a corner voxel by hand: only taps that land inside the volume contribute
    corner = sum(x[0, i, j, k] @ kernel[i + 1, j + 1, k + 1] for i in range(2) for j in range(2) for k in range(2))
    np.testing.assert_allclose(out[0, 0, 0, 0], corner, rtol=1e-5, atol=2e-5)


def test_winograd_rounding_error_stays_near_the_direct_sum():
    """F(4, 3) trades multiplies for additions of larger terms: against float64, its float32 error may
    grow a few times over the direct sum's, never to the 1e-4 the model parity is held to."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 12, 12, 12, 16))
    kernel = rng.normal(size=(3, 3, 3, 16, 8)) / np.sqrt(27 * 16)
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    exact = sum(np.einsum("bxyzc,co->bxyzo", pad[:, i:i + 12, j:j + 12, k:k + 12], kernel[i, j, k])
                for i in range(3) for j in range(3) for k in range(3))
    x32, k32 = jnp.float32(x), jnp.float32(kernel)
    direct = np.sqrt(np.mean((np.asarray(_lax_conv(x32, k32), np.float64) - exact) ** 2))
    winograd = np.sqrt(np.mean((np.asarray(conv3x3x3_winograd_x(x32, k32), np.float64) - exact) ** 2))
    assert winograd < max(8 * direct, 1e-7) and np.abs(np.asarray(conv3x3x3_winograd_x(x32, k32)) - exact).max() < 2e-5


def test_taps_accumulate_in_float32_for_bfloat16():
    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (1, 6, 6, 6, 2)).astype(jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (3, 3, 3, 2, 5)).astype(jnp.bfloat16)
    out = conv3x3x3_by_taps(x, kernel)
    ref = _lax_conv(x.astype(jnp.float32), kernel.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=2e-2)  # one bf16 rounding
    assert conv3x3x3_by_taps(x, kernel, preferred_element_type=jnp.float32).dtype == jnp.float32


def _conv_dims(fn, *args):
    """Spatial ranks of the convolutions in fn's jaxpr (and its sub-jaxprs, e.g. the rewrites' custom_vjp)."""
    from jax.extend import core as jex_core

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "conv_general_dilated":
                yield len(e.params["dimension_numbers"].lhs_spec) - 2
            for value in e.params.values():
                sub = getattr(value, "jaxpr", value)
                if isinstance(sub, jex_core.Jaxpr):
                    yield from walk(sub)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_flax_conv_takes_a_rewrite_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 4)
    monkeypatch.setattr(volume_conv, "MIN_IN_CHANNELS", 2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 5, 6, 2)), jnp.float32)
    cases = {  # (kernel, strides, padding) -> spatial ranks of the convolutions run
        (3, 1, 1): [2] * 6,  # Winograd F(4, 3) along X: six plane convolutions
        (3, 2, 1): [3],  # strided
        (1, 1, 0): [3],  # 1x1x1
        (3, 1, 0): [3],  # 'valid'
    }
    for (k, stride, pad), ranks in cases.items():
        conv = nn.Conv(3, (k,) * 3, strides=stride, padding=[(pad, pad)] * 3,
                       conv_general_dilated=volume_conv_general_dilated)
        plain = nn.Conv(3, (k,) * 3, strides=stride, padding=[(pad, pad)] * 3)
        variables = plain.init(jax.random.key(2), x)  # same parameter tree as a plain nn.Conv
        assert jax.tree.map(jnp.shape, conv.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, variables)
        assert _conv_dims(lambda v: conv.apply(v, x), variables) == ranks, (k, stride, pad)
        np.testing.assert_allclose(conv.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=2e-5)

    def run(x, kernel):  # traced afresh each call: the path is chosen at trace time from the module constants
        return volume_conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN)

    def chosen(x, kernel):
        return cpu_rewrite(x, kernel, (1, 1, 1), ((1, 1),) * 3, None, None, DN, 1, 1)

    kernel = jnp.ones((3, 3, 3, 2, 3))
    assert chosen(x, kernel) is conv3x3x3_winograd_x
    assert chosen(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)) is conv3x3x3_by_planes
    assert _conv_dims(lambda *a: run(*a), x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)) == [2]
    monkeypatch.setattr(volume_conv, "MIN_IN_CHANNELS", 3)  # 2 input channels are now few: the 27-tap loop
    assert chosen(x, kernel) is conv3x3x3_by_taps and _conv_dims(lambda *a: run(*a), x, kernel) == []
    np.testing.assert_allclose(run(x, kernel), _lax_conv(x, kernel), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 5)  # the 4-plane axis is now too small
    assert chosen(x, kernel) is None and _conv_dims(lambda *a: run(*a), x, kernel) == [3]


@pytest.mark.parametrize("layout", [("NCDHW", "OIDHW", "NCDHW"), ("NDHWC", "OIDHW", "NDHWC")])
def test_other_layouts_pass_through(layout, monkeypatch):
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 1)
    x = jnp.zeros((1, 4, 4, 4, 4))
    kernel = jnp.zeros((4, 4, 3, 3, 3))
    assert _conv_dims(lambda x: volume_conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3,
                                                            dimension_numbers=layout), x) == [3]


@pytest.mark.parametrize("channels", [8, 2])  # Winograd, and the 27-tap loop (few input channels)
def test_dispatcher_gradient_is_the_lax_convolutions(channels):
    """volume_conv_general_dilated's custom_vjp (dx by the flipped-kernel convolution, dkernel by the rewrite's
    kernel transpose) gives lax's gradients at a size that takes a rewrite."""
    shape = (1, 13, 12, 12, channels)
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (3, 3, 3, channels, 5)) / np.sqrt(27 * channels)
    cotangent = jax.random.normal(keys[2], shape[:-1] + (5,))
    assert cpu_rewrite(x, kernel, (1, 1, 1), ((1, 1),) * 3, None, None, DN, 1, 1) is not None

    def ours(x, k):
        return volume_conv_general_dilated(x, k, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN)

    def value_and_grads(fn):
        out, pullback = jax.vjp(fn, x, kernel)
        return out, pullback(cotangent)

    ref, (ref_dx, ref_dk) = jax.jit(lambda: value_and_grads(_lax_conv))()
    out, (dx, dk) = jax.jit(lambda: value_and_grads(ours))()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=2e-4)
