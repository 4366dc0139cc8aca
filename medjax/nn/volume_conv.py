"""3x3x3 'same' convolutions of large channels-last volumes rewritten for XLA:CPU.

XLA:CPU runs a 3D convolution through a generic loop that reaches a fraction of the CPU's matmul
throughput (on a 2-core AVX-512 host, 48 -> 48 channels at 96^3: 2.2 s, where 2D convolutions of the
same FLOPs take 1.3 s). On CPU, `volume_conv_general_dilated` therefore rewrites a stride-1, 3x3x3,
zero-padded-by-1 convolution of a volume of at least `MIN_PLANE_SIZE` per axis in one of three ways:

* float32 with at least `MIN_IN_CHANNELS` input channels: `conv3x3x3_winograd_x`, Winograd's minimal
  filtering F(4, 3) along X (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
  eq. 7: Y = A^T [(G g) * (B^T d)]) with the remaining 3x3 (Y, Z) taps as 2D convolutions over planes:
  every 4 output planes take 6 plane convolutions instead of 12, half the multiply-adds (48 -> 48 at
  96^3: 1.34 -> 0.98 s). Its rounding error is ~3x that of the direct sum (RMS 6e-7 vs 2e-7 against a
  float64 reference for unit-scale outputs), far inside the 1e-4 parity the models are held to.
* other float dtypes with at least `MIN_IN_CHANNELS` input channels: `conv3x3x3_by_planes`, one 2D
  convolution with the X axis folded into the batch and the three X taps into three groups of output
  channels, the shifted groups summed (each input plane read once):

      out[x] = sum_{i=0..2} conv2d_{YZ}(x_pad[x + i], W[i]) = sum_i Y[x + i, ..., i-th group],
      Y = conv2d_{YZ}(x_pad, concat_i W[i] over output channels).

* fewer input channels (the CT intensity itself): `conv3x3x3_by_taps`, the 27 shifted products summed in
  one elementwise loop (1 -> 48 at 96^3: 0.44 -> 0.08 s); convolution emitters are worst at depth 1.

Every other convolution (other shapes, strides, dilations, groups, layouts, small volumes, and every
backend but CPU, where cuDNN / the TPU convolution emitter are the fast path) goes to
`lax.conv_general_dilated` unchanged. Pass it to Flax as `nn.Conv(..., conv_general_dilated=
volume_conv_general_dilated)`: the parameters (names, shapes, layout) are those of a plain `nn.Conv`.
All three rewrites are linear maps of (x, kernel). `volume_conv_general_dilated` differentiates them
with a `custom_vjp` (`_conv_light_vjp`) that keeps only (x, kernel): dx is the same 'same' convolution of
the cotangent with the spatially flipped, in/out-transposed kernel (through the rewrite again), dkernel
JAX's transpose of the rewrite with respect to the kernel only. (JAX's transpose of the whole rewrite
pads each strided plane slice's cotangent back to the full volume: 330 MiB buffers for the Universal
Model's 96-channel decoder at 96^3. With lax's 3D filter gradient for dkernel instead, that train step
planned 7.3 GiB rather than 12.3 GiB on CPU, but the gradient ran 2.7x slower: not the default.)
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MIN_PLANE_SIZE = 12  # below this per spatial axis, lax's 3D convolution is as fast (small volumes)
MIN_IN_CHANNELS = 8  # with fewer input channels (e.g. the CT intensity itself), the 27-tap loop wins
# Flax nn.Conv's dimension numbers for channels-last 3D inputs: lhs / out (N, X, Y, Z, C), rhs (X, Y, Z, I, O).
_CHANNELS_LAST_3D = lax.ConvDimensionNumbers(lhs_spec=(0, 4, 1, 2, 3), rhs_spec=(4, 3, 0, 1, 2),
                                             out_spec=(0, 4, 1, 2, 3))
# Winograd F(4, 3) with interpolation points 0, +-1, +-2 and infinity (Lavin & Gray 2016, section 4.2):
# input transform B^T (6x6), filter transform G (6x3), output transform A^T (4x6).
_WINOGRAD_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_WINOGRAD_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]], np.float64)
_WINOGRAD_OUT = 4  # output planes per tile (m); a tile reads m + 2 input planes


def _conv2d_same(planes: jax.Array, kernel: jax.Array, precision: Any, preferred_element_type: Any) -> jax.Array:
    """planes (n, Y, Z, c) * kernel (3, 3, c, o), stride 1, zero padding 1."""
    return lax.conv_general_dilated(planes, kernel, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                                    preferred_element_type=preferred_element_type)


def _combine(coefficients: np.ndarray, arrays: Sequence[jax.Array]) -> jax.Array:
    """sum_s coefficients[s] * arrays[s] over the non-zero coefficients (one elementwise fusion)."""
    terms = [a if c == 1 else -a if c == -1 else a * float(c) for c, a in zip(coefficients, arrays) if c != 0]
    return sum(terms[1:], terms[0])


def conv3x3x3_by_planes(x: jax.Array, kernel: jax.Array, *, precision: Any = None,
                        preferred_element_type: Any = None) -> jax.Array:
    """x (b, X, Y, Z, c) * kernel (3, 3, 3, c, o), stride 1, zero padding 1 -> (b, X, Y, Z, o): the same
    numbers as `lax.conv_general_dilated` (up to summation order), via one 2D convolution (module doc)."""
    b, d, h, w, c = x.shape
    o = kernel.shape[-1]
    planes = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0))).reshape(b * (d + 2), h, w, c)
    taps = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(3, 3, c, 3 * o)  # output channels (x tap i, o)
    y = _conv2d_same(planes, taps, precision, preferred_element_type).reshape(b, d + 2, h, w, 3 * o)
    return y[:, 0:d, ..., :o] + y[:, 1:d + 1, ..., o:2 * o] + y[:, 2:d + 2, ..., 2 * o:]


def conv3x3x3_winograd_x(x: jax.Array, kernel: jax.Array, *, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """x (b, X, Y, Z, c) * kernel (3, 3, 3, c, o), stride 1, zero padding 1 -> (b, X, Y, Z, o) by Winograd
    F(4, 3) along X (Lavin & Gray 2016, eq. 7) and 2D convolutions over (Y, Z) planes.

    X is cut into tiles of 4 output planes (zero planes appended when X is not a multiple of 4, their
    outputs dropped); tile n reads the 6 zero-padded input planes d_s = x_pad[4n + s]. For each of the 6
    transformed inputs v_t = sum_s B^T[t, s] d_s the product with the transformed filter u_t = sum_i
    G[t, i] kernel[i] is one 2D convolution of all tiles' planes, and out[4n + p] = sum_t A^T[p, t] m_t."""
    b, d, h, w, c = x.shape
    o = kernel.shape[-1]
    m = _WINOGRAD_OUT
    tiles = -(-d // m)
    x_pad = jnp.pad(x, ((0, 0), (1, m * tiles - d + 1), (0, 0), (0, 0), (0, 0)))  # m * tiles + 2 planes
    inputs = [lax.slice_in_dim(x_pad, s, s + m * (tiles - 1) + 1, m, axis=1) for s in range(m + 2)]
    filters = jnp.einsum("ti,iyzco->tyzco", jnp.asarray(_WINOGRAD_G, kernel.dtype), kernel,
                         precision=lax.Precision.HIGHEST)
    products = []
    for t in range(m + 2):
        v = _combine(_WINOGRAD_BT[t], inputs).reshape(b * tiles, h, w, c)
        products.append(_conv2d_same(v, filters[t], precision, preferred_element_type).reshape(b, tiles, h, w, o))
    y = jnp.stack([_combine(_WINOGRAD_AT[p], products) for p in range(m)], axis=2)
    return y.reshape(b, m * tiles, h, w, o)[:, :d]


def conv3x3x3_by_taps(x: jax.Array, kernel: jax.Array, *, precision: Any = None,
                      preferred_element_type: Any = None) -> jax.Array:
    """x (b, X, Y, Z, c) * kernel (3, 3, 3, c, o), stride 1, zero padding 1 -> (b, X, Y, Z, o) as the 27 * c
    shifted products x_pad[x + i, y + j, z + k, ci] * kernel[i, j, k, ci] summed in one elementwise loop, in
    at least float32 (for few input channels: 27 * c multiply-adds per output element). `precision` is
    moot here: every product is exact in the accumulation dtype."""
    del precision
    b, d, h, w, c = x.shape
    acc_dtype = jnp.promote_types(preferred_element_type or x.dtype, jnp.float32)
    out_dtype = preferred_element_type or jnp.result_type(x.dtype, kernel.dtype)
    x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0))).astype(acc_dtype)
    kernel = kernel.astype(acc_dtype)
    terms = [x_pad[:, i:i + d, j:j + h, k:k + w, ci:ci + 1] * kernel[i, j, k, ci]
             for i, j, k, ci in itertools.product(range(3), range(3), range(3), range(c))]
    return sum(terms[1:], terms[0]).astype(out_dtype)


def cpu_rewrite(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None, dimension_numbers: Any,
                feature_group_count: int, batch_group_count: int):
    """The rewrite `volume_conv_general_dilated` takes for this call (module doc), or None for lax's own."""
    if jax.default_backend() != "cpu" or lhs.ndim != 5 or rhs.shape[:3] != (3, 3, 3):
        return None
    if feature_group_count != 1 or batch_group_count != 1 or tuple(window_strides) != (1, 1, 1):
        return None
    if any(d is not None and tuple(d) != (1, 1, 1) for d in (lhs_dilation, rhs_dilation)):
        return None
    if isinstance(padding, str) or tuple(tuple(p) for p in padding) != ((1, 1),) * 3:
        return None
    if dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) \
            != _CHANNELS_LAST_3D:
        return None
    if min(lhs.shape[1:4]) < MIN_PLANE_SIZE:
        return None
    if rhs.shape[3] < MIN_IN_CHANNELS:
        return conv3x3x3_by_taps
    if lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32:
        return conv3x3x3_winograd_x
    return conv3x3x3_by_planes


def volume_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                                lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers: Any = None, feature_group_count: int = 1,
                                batch_group_count: int = 1, precision: Any = None,
                                preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the CPU rewrites of 3x3x3 'same' convolutions of volumes of at least
    `MIN_PLANE_SIZE` per axis (module doc); any other call is passed through."""
    rewrite = cpu_rewrite(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, batch_group_count)
    if rewrite is not None:
        return _conv_light_vjp(lhs, rhs, rewrite, precision, preferred_element_type)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)


_SAME_3X3X3 = dict(window_strides=(1, 1, 1), padding=((1, 1),) * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_light_vjp(x: jax.Array, kernel: jax.Array, rewrite, precision, preferred_element_type) -> jax.Array:
    """rewrite(x, kernel) whose backward keeps only (x, kernel) (module doc)."""
    return rewrite(x, kernel, precision=precision, preferred_element_type=preferred_element_type)


def _conv_light_vjp_fwd(x, kernel, rewrite, precision, preferred_element_type):
    return _conv_light_vjp(x, kernel, rewrite, precision, preferred_element_type), (x, kernel)


def _conv_light_vjp_bwd(rewrite, precision, preferred_element_type, residuals, g):
    """dx = conv(g, flip(kernel) with in/out swapped), a 'same' 3x3x3 convolution itself (through the rewrite
    when one applies); dkernel = JAX's transpose of the rewrite with respect to the kernel alone (x fixed:
    no full-volume cotangent of x is formed). On the shared 2-core CPU at 48^3, 96 -> 48 channels, float32:
    2.5 s for (dx, dkernel), as JAX's transpose of the whole rewrite (2.5 s); lax's 3D filter gradient
    alone takes 6.7 s."""
    x, kernel = residuals
    flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
    dx = volume_conv_general_dilated(g, flipped.astype(g.dtype), precision=precision, **_SAME_3X3X3)
    dkernel = jax.vjp(functools.partial(_apply_to_kernel, rewrite, x, precision, preferred_element_type), kernel)[1](g)[0]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _apply_to_kernel(rewrite, x, precision, preferred_element_type, kernel):
    return rewrite(x, kernel, precision=precision, preferred_element_type=preferred_element_type)


_conv_light_vjp.defvjp(_conv_light_vjp_fwd, _conv_light_vjp_bwd)
