"""Masked language modelling loss (BERT, Devlin et al., NAACL 2019, Sec. 3.1 "Task #1: Masked LM"), as
PTUnifier's MLM objective (Chen et al., ICCV 2023, Sec. 3.4): cross-entropy of the vocabulary logits at
the masked positions only,

    L = -1/|M| sum_{t in M} log softmax(logits_t)[label_t],   M = {t : label_t != ignore_index}

which is `torch.nn.functional.cross_entropy(..., ignore_index=-100)` of the original. Labels hold the
original token at the masked (15%, 80/10/10) positions and `ignore_index` elsewhere. Float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"medjax/losses/mlm.py: logits {logits.shape} must be labels {labels.shape} + (vocab,)")


def mlm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over the positions whose label is not `ignore_index` (0 when there are none)."""
    _check(logits, labels)
    valid = labels != ignore_index
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def mlm_accuracy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Fraction of masked positions whose argmax is the label."""
    _check(logits, labels)
    valid = labels != ignore_index
    hits = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(hits) / jnp.maximum(jnp.sum(valid), 1)
