"""PTUnifier's prompt pools (Chen et al., ICCV 2023, Sec. 3.2, "Prompt Pool"): a bank of soft prompts
from which the k most relevant are drawn to stand in for a missing modality.

    q    = pooling(X^present)                       # mean of the present modality's input embeddings
    idx  = top-k_{w in pool} (w^T q)                # raw dot products, per sample (Eq. 2 / 3)
    PT   = pool[idx]                                # (batch, k, width), in descending score order

The pool is (size, width), initialised N(0, 0.02) as in the original code (2048 x 768 in the paper's
configuration). The selection is discrete: no gradient reaches the query. With `trainable=True` (the
paper) the selected rows receive gradients through the gather; `trainable=False` reproduces the released
code, which selects under `torch.no_grad()` so the pools never change.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def select_prompts(query: jax.Array, pool: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(batch, width) queries, (size, width) pool -> (prompts (batch, k, width), indices (batch, k)).

    Indices are top-k of query . pool^T (highest first; ties by lower index, `jax.lax.top_k`)."""
    if query.ndim != 2 or pool.ndim != 2 or query.shape[-1] != pool.shape[-1]:
        raise ValueError(f"medjax/models/prompt_pool.py select_prompts: expected query (batch, width) and pool "
                         f"(size, width) of the same width; got {query.shape} and {pool.shape}")
    if not 0 < k <= pool.shape[0]:
        raise ValueError(f"medjax/models/prompt_pool.py select_prompts: k={k} prompts from a pool of "
                         f"{pool.shape[0]}; expected 0 < k <= pool size")
    scores = jnp.einsum("bd,nd->bn", query.astype(jnp.float32), pool.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
    return jnp.take(pool, indices, axis=0), indices


class PromptPool(nn.Module):
    """A learnable pool of `size` soft prompts of `width`; `__call__(query, k)` -> (prompts, indices)."""

    size: int = 2048
    width: int = 768
    trainable: bool = True  # False: the released code's frozen pools (selection under no_grad)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        pool = self.param("pool", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                          (self.size, self.width), self.param_dtype)
        if not self.trainable:
            pool = jax.lax.stop_gradient(pool)
        prompts, indices = select_prompts(query, pool, k)
        return prompts.astype(self.dtype), indices
