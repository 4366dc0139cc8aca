"""Vector quantisation with an exponential-moving-average codebook (van den Oord et al., "Neural Discrete
Representation Learning", NeurIPS 2017, Eq. 3 and Appendix A.1; Razavi et al., VQ-VAE-2, NeurIPS 2019), as
ViSD-Boost's `VectorQuantizerEMA` (alibaba-damo-academy/ViSD-Boost `lavis/utils/model.py`).

    k(x)  = argmin_j ||x - e_j||^2                                        (nearest code, all K codes)
    N_j  <- EMA_decay(sum_i [k(x_i) = j])                                  (cluster sizes)
    m_j  <- EMA_decay(sum_i [k(x_i) = j] x_i)                              (code sums)
    EMA_decay(v)_t = h_t / (1 - decay^t),  h_t = h_{t-1} - (h_{t-1} - v)(1 - decay),  h_0 = 0  (bias-corrected)
    N~_j  = (N_j + eps) / (n + K eps) n,  n = sum_j N_j                    (Laplace smoothing)
    e_j  <- m_j / N~_j
    loss  = beta ||x - sg(e_k(x))||^2 (mean),  beta = 0.25                 (commitment, Eq. 3's last term)
    q     = x + sg(e_k(x) - x)                                             (straight-through gradient)

The codebook is not trained by the optimizer: the embeddings and the EMA state live in the `codebook`
variable collection ("embeddings" (K, D), "cluster_size" (K,) and "code_sum" (K, D) hidden EMA values,
"count" the EMA step), updated in place when that collection is mutable and `update=True`. `weights`
(per vector, 0/1) restrict the statistics and the commitment loss to valid vectors (padding, or ViSD-Boost's
normal organs). Init: xavier-uniform embeddings (ViSD-Boost: 4 x 100 codes of 768), decay 0.99, eps 1e-5.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def code_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared L2 distances (N, K) of vectors x (N, D) to the codes (K, D), as the original computes them."""
    x, codebook = x.astype(jnp.float32), codebook.astype(jnp.float32)
    return (jnp.sum(x ** 2, -1, keepdims=True) + jnp.sum(codebook ** 2, -1)
            - 2.0 * jnp.matmul(x, codebook.T, precision=_HIGHEST))


def nearest_codes(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of each vector's nearest code (N,), int32 (ties: the lowest index, as torch.argmin)."""
    return jnp.argmin(code_distances(x, codebook), axis=-1).astype(jnp.int32)


def ema_statistics(x: jax.Array, indices: jax.Array, num_codes: int, weights: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """This batch's (cluster counts (K,), code sums (K, D)) over the vectors with weight 1."""
    encodings = jax.nn.one_hot(indices, num_codes, dtype=jnp.float32)
    if weights is not None:
        encodings = encodings * weights.astype(jnp.float32)[:, None]
    return encodings.sum(0), jnp.matmul(encodings.T, x.astype(jnp.float32), precision=_HIGHEST)


def ema_update(state: dict, counts: jax.Array, code_sum: jax.Array, decay: float, eps: float) -> dict:
    """The next codebook state (module docstring) from this batch's statistics; `state` holds "embeddings",
    "cluster_size", "code_sum" (hidden EMA values) and "count"."""
    count = state["count"] + 1.0
    correction = 1.0 - decay ** count
    hidden_size = state["cluster_size"] - (state["cluster_size"] - counts) * (1.0 - decay)
    hidden_sum = state["code_sum"] - (state["code_sum"] - code_sum) * (1.0 - decay)
    size = hidden_size / correction
    n = jnp.sum(size)
    size = (size + eps) / (n + size.shape[0] * eps) * n
    return {"embeddings": (hidden_sum / correction) / size[:, None], "cluster_size": hidden_size,
            "code_sum": hidden_sum, "count": count}


def quantize(x: jax.Array, codebook: jax.Array, weights: jax.Array | None = None, commitment_cost: float = 0.25,
             straight_through: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(quantized (N, D), indices (N,), commitment loss) of vectors x (N, D). The loss is the weighted mean
    over vectors and features; without `straight_through` the quantized vectors carry no gradient to x."""
    indices = nearest_codes(jax.lax.stop_gradient(x), codebook)
    codes = jnp.take(jax.lax.stop_gradient(codebook), indices, axis=0).astype(x.dtype)
    error = jnp.square(x.astype(jnp.float32) - codes.astype(jnp.float32)).mean(-1)
    if weights is None:
        loss = error.mean()
    else:
        w = weights.astype(jnp.float32)
        loss = jnp.sum(error * w) / jnp.maximum(w.sum(), 1.0)
    quantized = x + jax.lax.stop_gradient(codes - x) if straight_through else codes
    return quantized, indices, commitment_cost * loss


class VectorQuantizerEMA(nn.Module):
    """x (..., D) -> (quantized (..., D), indices (...), commitment loss); the EMA codebook in the `codebook`
    collection, updated when `update` and the collection is mutable (module docstring)."""

    num_codes: int = 400
    dim: int = 768
    decay: float = 0.99
    epsilon: float = 1e-5
    commitment_cost: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array | None = None, *, update: bool = False,
                 straight_through: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"medjax/nn/vq.py VectorQuantizerEMA: vectors of width {self.dim} expected, got {x.shape}")
        k, d = self.num_codes, self.dim
        box = lambda init, shape, axes: (lambda: nn.Partitioned(init(shape), axes))  # noqa: E731
        embeddings = self.variable("codebook", "embeddings", lambda: nn.Partitioned(
            nn.initializers.xavier_uniform()(self.make_rng("params"), (k, d), jnp.float32), (None, "embed")))
        cluster_size = self.variable("codebook", "cluster_size", box(lambda s: jnp.zeros(s, jnp.float32), (k,), (None,)))
        code_sum = self.variable("codebook", "code_sum", box(lambda s: jnp.zeros(s, jnp.float32), (k, d),
                                                              (None, "embed")))
        count = self.variable("codebook", "count", box(lambda s: jnp.zeros(s, jnp.float32), (), ()))
        flat = x.reshape(-1, d)
        flat_w = None if weights is None else weights.reshape(-1)
        quantized, indices, loss = quantize(flat, embeddings.value, flat_w, self.commitment_cost, straight_through)
        if update and self.is_mutable_collection("codebook") and not self.is_initializing():
            counts, sums = ema_statistics(jax.lax.stop_gradient(flat), indices, k, flat_w)
            state = ema_update({"embeddings": embeddings.value, "cluster_size": cluster_size.value,
                                "code_sum": code_sum.value, "count": count.value}, counts, sums, self.decay, self.epsilon)
            embeddings.value, cluster_size.value = state["embeddings"], state["cluster_size"]
            code_sum.value, count.value = state["code_sum"], state["count"]
        return quantized.reshape(x.shape), indices.reshape(x.shape[:-1]), loss
