"""Top-k relation-masking attention (MRM, Yang et al., ICCV 2023, Sec. 3.2.1).

R = softmax(Q K^T / sqrt(d)) per head; for each row p, r_p is the k-th largest entry of the
row with k = floor(ratio * kv_tokens); entries >= r_p are set to 0 (ties with r_p are masked
too, k = 0 masks nothing), the row is NOT renormalised, and the output is R^M V.

`relation_mask_attention_reference` is the definition, in plain jnp. It materialises the
(q_tokens, kv_tokens) matrix per head; the Pallas kernel (same contract) avoids that.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def masked_count(ratio: float, kv_tokens: int) -> int:
    """k = floor(ratio * kv_tokens): how many of the largest relations each row masks."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"relation masking ratio must be in [0, 1), got {ratio}")
    return int(math.floor(ratio * kv_tokens))


def relation_mask_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, ratio: float) -> jax.Array:
    """MRM Eq. (self/cross relation masking): z = R^M V.

    q: (batch, q_tokens, heads, head_dim); k, v: (batch, kv_tokens, heads, head_dim).
    Returns (batch, q_tokens, heads, head_dim) in q's dtype; the softmax is computed in fp32.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    kv_tokens = k.shape[1]
    top = masked_count(ratio, kv_tokens)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    if top > 0:
        kth_largest = jax.lax.top_k(jax.lax.stop_gradient(probs), top)[0][..., top - 1:top]
        probs = jnp.where(probs >= kth_largest, 0.0, probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def relation_mask_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, ratio: float, impl: str = "auto") -> jax.Array:
    """Relation-masking attention through the implementation chosen by `impl`.

    impl: "reference" (plain jnp) or "auto". (The Pallas kernel lands in the kernels issue.)
    """
    if impl not in ("auto", "reference"):
        raise ValueError(f"kernels.impl must be 'auto' or 'reference' here, got {impl!r}")
    return relation_mask_attention_reference(q, k, v, ratio=ratio)
