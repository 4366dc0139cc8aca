"""Global L2 norm of a pytree with few XLA ops: what the trainer logs (grad / param / update norm) and clips by.

`optax.tree.norm` squares and reduces every leaf on its own: a model with L leaves adds 2L ops per norm to the
train step (a ViT's 163 leaves: ~330 fusions per norm), and on XLA:CPU each fusion is its own generated
function, so the trainer's three norms cost ~6 CPU s of compile per tiny train step. Here the small leaves
(biases, norms, tokens; most of a model's leaves but little of its size) are cast to float32, flattened and
concatenated into chunks of at most `CHUNK_ELEMENTS`, one reduction each; a large leaf keeps its own
reduction, so the concatenated temporaries stay small (no copy of the large weights). The value is the same
sum of squares in float32 (summation order differs: equal to `optax.tree.norm` to float rounding).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SMALL_LEAF_ELEMENTS = 1 << 16  # leaves up to this size are concatenated (a 256x256 kernel, any bias or norm)
CHUNK_ELEMENTS = 1 << 22  # at most this many elements (16 MiB in float32) per concatenated chunk


def sum_of_squares(tree: Any) -> jax.Array:
    """sum over leaves of sum(x ** 2), in float32: one reduction per chunk of small leaves and per large leaf."""
    total = jnp.zeros((), jnp.float32)
    chunk, chunk_size = [], 0

    def flush():
        nonlocal total, chunk, chunk_size
        if chunk:
            flat = jnp.concatenate(chunk) if len(chunk) > 1 else chunk[0]
            total = total + jnp.sum(flat * flat)
        chunk, chunk_size = [], 0

    for leaf in jax.tree.leaves(tree):
        leaf = jnp.asarray(leaf)
        if leaf.size == 0:
            continue
        leaf = leaf.astype(jnp.float32)
        if leaf.size > SMALL_LEAF_ELEMENTS:
            total = total + jnp.sum(jnp.square(leaf))
            continue
        if chunk_size + leaf.size > CHUNK_ELEMENTS:
            flush()
        chunk.append(leaf.reshape(-1))
        chunk_size += leaf.size
    flush()
    return total


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum of squares over every leaf): torch `clip_grad_norm_`'s total norm, `optax.tree.norm`'s value."""
    return jnp.sqrt(sum_of_squares(tree))
