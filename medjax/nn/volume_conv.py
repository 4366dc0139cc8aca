"""3x3x3 'same' convolutions of large volumes computed as one 2D convolution over (Y, Z) planes.

XLA:CPU runs a 3D convolution through a generic loop that reaches a fraction of the CPU's matmul
throughput (on a 2-core AVX-512 host, 48 -> 48 channels at 96^3: 2.2 s, where a 2D convolution of the
same FLOPs takes 1.3 s). On CPU, `volume_conv_general_dilated` therefore rewrites a stride-1, 3x3x3,
zero-padded-by-1 convolution of a channels-last volume as a 2D convolution: the X axis (zero-padded by
one plane) is folded into the batch, and the three X taps of the kernel become three groups of output
channels,

    out[x] = sum_{i=0..2} conv2d_{YZ}(x_pad[x + i], W[i])  =  sum_i Y[x + i, ..., i-th channel group],
    Y = conv2d_{YZ}(x_pad, concat_i W[i] over output channels),

so each input plane is read once and the three shifted slices of Y are summed in one fused pass.
Every other convolution (other shapes, strides, dilations, groups, small volumes, and every backend
but CPU, where cuDNN / the TPU convolution emitter are the fast path) goes to `lax.conv_general_dilated`
unchanged. Pass it to Flax as `nn.Conv(..., conv_general_dilated=volume_conv_general_dilated)`: the
parameters (names, shapes, layout) are those of a plain `nn.Conv`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

MIN_PLANE_SIZE = 12  # below this per spatial axis, lax's 3D convolution is as fast (small volumes)
MIN_IN_CHANNELS = 8  # with fewer input channels (e.g. the CT intensity itself), too
# Flax nn.Conv's dimension numbers for channels-last 3D inputs: lhs / out (N, X, Y, Z, C), rhs (X, Y, Z, I, O).
_CHANNELS_LAST_3D = lax.ConvDimensionNumbers(lhs_spec=(0, 4, 1, 2, 3), rhs_spec=(4, 3, 0, 1, 2),
                                             out_spec=(0, 4, 1, 2, 3))


def conv3x3x3_by_planes(x: jax.Array, kernel: jax.Array, *, precision: Any = None,
                        preferred_element_type: Any = None) -> jax.Array:
    """x (b, X, Y, Z, c) * kernel (3, 3, 3, c, o), stride 1, zero padding 1 -> (b, X, Y, Z, o): the same
    numbers as `lax.conv_general_dilated` (up to summation order), via one 2D convolution (module doc)."""
    b, d, h, w, c = x.shape
    o = kernel.shape[-1]
    planes = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0))).reshape(b * (d + 2), h, w, c)
    taps = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(3, 3, c, 3 * o)  # output channels (x tap i, o)
    y = lax.conv_general_dilated(planes, taps, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=precision, preferred_element_type=preferred_element_type)
    y = y.reshape(b, d + 2, h, w, 3 * o)
    return y[:, 0:d, ..., :o] + y[:, 1:d + 1, ..., o:2 * o] + y[:, 2:d + 2, ..., 2 * o:]


def _plane_path_applies(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                        lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
                        dimension_numbers: Any, feature_group_count: int, batch_group_count: int) -> bool:
    if jax.default_backend() != "cpu" or lhs.ndim != 5 or rhs.shape[:3] != (3, 3, 3):
        return False
    if feature_group_count != 1 or batch_group_count != 1 or tuple(window_strides) != (1, 1, 1):
        return False
    if any(d is not None and tuple(d) != (1, 1, 1) for d in (lhs_dilation, rhs_dilation)):
        return False
    if isinstance(padding, str) or tuple(tuple(p) for p in padding) != ((1, 1),) * 3:
        return False
    if dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) \
            != _CHANNELS_LAST_3D:
        return False
    return min(lhs.shape[1:4]) >= MIN_PLANE_SIZE and rhs.shape[3] >= MIN_IN_CHANNELS


def volume_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                                lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers: Any = None, feature_group_count: int = 1,
                                batch_group_count: int = 1, precision: Any = None,
                                preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the CPU plane rewrite for 3x3x3 'same' convolutions of volumes of at
    least `MIN_PLANE_SIZE` per axis with at least `MIN_IN_CHANNELS` input channels (module doc); any other
    call is passed through."""
    if _plane_path_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                           feature_group_count, batch_group_count):
        return conv3x3x3_by_planes(lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)
