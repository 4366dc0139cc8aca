"""The Universal Model's dynamic head (Liu et al., ICCV 2023, Sec. 3, Eq. 2 without the sigmoid) as one
XLA loop fusion: the CPU path of `medjax.kernels.dynamic_conv3d.dynamic_head`.

Per voxel and class the head is the 8 -> 8 -> 8 -> 1 MLP
    h1 = relu(W1 x + b1),  h2 = relu(W2 h1 + b2),  logit = W3 h2 + b3,
with (W, b) split from the controller's 153 numbers in the original's order (`split_dynamic_params`).
`dynamic_head_reference` writes it as einsums, which XLA:CPU runs as batched matmuls of width 8 that
materialise (batch, voxels, classes, 8) activations twice. Here every hidden unit is written out as a
sum of 8 products over (voxels, classes) arrays, so the whole head is elementwise arithmetic that XLA
fuses into one pass reading the 8 features of a voxel and writing its class logits (the CPU analogue
of the Pallas kernel's tile loop). Under differentiation the reference runs instead, forward and
backward (a `custom_vjp`): autodiff of the unrolled form would be 153 separate reductions. The
backward keeps only the inputs and recomputes the reference one chunk of classes at a time
(`lax.map` over `backward_chunk(classes)` classes, dfeatures summed over the chunks), so training holds
(batch, voxels, chunk, 8) hidden activations at a time instead of (batch, voxels, classes, 8) several
times over: at the paper's 96^3 crop and 32 classes each full array is 864 MiB, and keeping the
reference's vjp put several of them in the Universal train step's peak (planned on CPU at batch 1 by
`python -m medjax.bench memory --exp universal_swin --batch-size 1`: 19,815 MiB before, 15,312 after).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.kernels.dynamic_conv3d import CHANNELS, _check_inputs, dynamic_head_reference, split_dynamic_params

_WHERE = "medjax/kernels/dynamic_head_fused.py"


def _unrolled_head(features: jax.Array, params: jax.Array) -> jax.Array:
    w1, w2, w3, b1, b2, b3 = (a[:, None, None, None] for a in split_dynamic_params(params.astype(jnp.float32)))
    x = features.astype(jnp.float32)[..., None, :]  # (b, D, H, W, 1, 8): broadcast over classes

    def layer(inputs, weight, bias, outputs, activation):
        return [activation(bias[..., o] + sum(inputs[i] * weight[..., o, i] for i in range(CHANNELS)))
                for o in range(outputs)]

    x = [x[..., i] for i in range(CHANNELS)]  # each (b, D, H, W, 1)
    h1 = layer(x, w1, b1, CHANNELS, jax.nn.relu)  # each (b, D, H, W, classes)
    h2 = layer(h1, w2, b2, CHANNELS, jax.nn.relu)
    logits = layer(h2, w3, b3, 1, lambda v: v)[0]
    return logits.astype(jnp.result_type(features.dtype, params.dtype))  # the reference's output dtype


CHUNK_CLASSES = 4  # classes recomputed together in the backward pass


def backward_chunk(classes: int, target: int = CHUNK_CLASSES) -> int:
    """The largest divisor of `classes` that is at most `target` (classes per recomputed chunk)."""
    return max(d for d in range(1, min(classes, target) + 1) if classes % d == 0)


@jax.custom_vjp
def _fused_head(features: jax.Array, params: jax.Array) -> jax.Array:
    return _unrolled_head(features, params)


def _fused_head_fwd(features, params):
    """Under differentiation the forward keeps only its inputs; the backward recomputes (module doc)."""
    return _unrolled_head(features, params), (features, params)


def _fused_head_bwd(residuals, g):
    """The reference's vjp, `chunk` classes at a time: dparams per chunk, dfeatures summed over chunks."""
    features, params = residuals
    b, classes = params.shape[:2]
    chunk = backward_chunk(classes)
    n = classes // chunk
    params_chunks = jnp.moveaxis(params.reshape(b, n, chunk, params.shape[-1]), 1, 0)  # (n, b, chunk, 153)
    g_chunks = jnp.moveaxis(g.reshape(*g.shape[:-1], n, chunk), -2, 0)  # (n, b, D, H, W, chunk)

    def one_chunk(dfeatures, inputs):
        p, g_chunk = inputs
        _, vjp = jax.vjp(dynamic_head_reference, features, p)
        df, dp = vjp(g_chunk)
        return dfeatures + df.astype(dfeatures.dtype), dp

    dfeatures, dparams = jax.lax.scan(one_chunk, jnp.zeros(features.shape, jnp.float32), (params_chunks, g_chunks))
    dparams = jnp.moveaxis(dparams, 0, 1).reshape(params.shape)
    return dfeatures.astype(features.dtype), dparams.astype(params.dtype)


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def dynamic_head_fused(features: jax.Array, params: jax.Array) -> jax.Array:
    """features (batch, D, H, W, 8), params (batch, classes, 153) -> logits (batch, D, H, W, classes), the
    numbers of `dynamic_head_reference` (fp32 arithmetic, promoted input dtype out) in one fused pass;
    differentiated, it is the reference (module doc)."""
    _check_inputs(features, params, f"{_WHERE} dynamic_head_fused")
    return _fused_head(features, params)
