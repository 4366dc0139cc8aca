"""The CPU plane rewrite of 3x3x3 'same' convolutions (medjax.nn.volume_conv) against lax's 3D
convolution: values and gradients, and which calls it takes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax.nn import volume_conv
from medjax.nn.volume_conv import conv3x3x3_by_planes, volume_conv_general_dilated

DN = ("NDHWC", "DHWIO", "NDHWC")


def _lax_conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN)


def test_planes_equal_lax_3d_convolution_forward_and_gradients():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 5, 6, 7, 3))  # unequal sides: the folded axis is X
    kernel = jax.random.normal(keys[1], (3, 3, 3, 3, 4))
    cotangent = jax.random.normal(keys[2], (2, 5, 6, 7, 4))

    def value_and_grads(fn):
        out, pullback = jax.vjp(fn, x, kernel)
        return out, pullback(cotangent)

    ref, (ref_dx, ref_dk) = jax.jit(lambda: value_and_grads(_lax_conv))()
    out, (dx, dk) = jax.jit(lambda: value_and_grads(conv3x3x3_by_planes))()
    assert out.shape == (2, 5, 6, 7, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)
    # a corner voxel by hand: only taps that land inside the volume contribute
    corner = sum(x[0, i, j, k] @ kernel[i + 1, j + 1, k + 1] for i in range(2) for j in range(2) for k in range(2))
    np.testing.assert_allclose(out[0, 0, 0, 0], corner, rtol=1e-5, atol=1e-5)


def _conv_dims(fn, *args):
    """Spatial ranks of the convolutions in fn's jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [len(e.params["dimension_numbers"].lhs_spec) - 2 for e in jaxpr.eqns
            if e.primitive.name == "conv_general_dilated"]


def test_flax_conv_takes_the_plane_path_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 4)
    monkeypatch.setattr(volume_conv, "MIN_IN_CHANNELS", 2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 5, 6, 2)), jnp.float32)
    cases = {  # (kernel, strides, padding) -> spatial rank of the convolution run
        (3, 1, 1): 2,  # the rewrite
        (3, 2, 1): 3,  # strided
        (1, 1, 0): 3,  # 1x1x1
        (3, 1, 0): 3,  # 'valid'
    }
    for (k, stride, pad), rank in cases.items():
        conv = nn.Conv(3, (k,) * 3, strides=stride, padding=[(pad, pad)] * 3,
                       conv_general_dilated=volume_conv_general_dilated)
        plain = nn.Conv(3, (k,) * 3, strides=stride, padding=[(pad, pad)] * 3)
        variables = plain.init(jax.random.key(2), x)  # same parameter tree as a plain nn.Conv
        assert jax.tree.map(jnp.shape, conv.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, variables)
        assert _conv_dims(lambda v: conv.apply(v, x), variables) == [rank], (k, stride, pad)
        np.testing.assert_allclose(conv.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 5)  # the 4-plane axis is now too small
    kernel = jnp.ones((3, 3, 3, 2, 3))
    assert _conv_dims(lambda x: volume_conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3,
                                                            dimension_numbers=DN), x) == [3]
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 4)
    monkeypatch.setattr(volume_conv, "MIN_IN_CHANNELS", 3)  # 2 input channels are now too few
    assert _conv_dims(lambda x: volume_conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3,
                                                            dimension_numbers=DN), x) == [3]


@pytest.mark.parametrize("layout", [("NCDHW", "OIDHW", "NCDHW"), ("NDHWC", "OIDHW", "NDHWC")])
def test_other_layouts_pass_through(layout, monkeypatch):
    monkeypatch.setattr(volume_conv, "MIN_PLANE_SIZE", 1)
    x = jnp.zeros((1, 4, 4, 4, 4))
    kernel = jnp.zeros((4, 4, 3, 3, 3))
    assert _conv_dims(lambda x: volume_conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3,
                                                            dimension_numbers=layout), x) == [3]
