"""Image-text matching (ITM; UNITER / METER, as PTUnifier's ITM objective, Chen et al., ICCV 2023,
Sec. 3.4): a binary classifier on the joint [CLS] feature decides whether image and text belong
together. As in the original `compute_itm`, floor(B/2) samples keep their own image (label 1) and the
rest (label 0) get another sample's image, the labels shuffled; the negative image is drawn uniformly
from the OTHER samples of the global batch (the original draws a random dataset image).

    L = CE(logits, labels)  over the 2 classes [not matched, matched]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def itm_pairs(rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(labels (B,) int32, image_index (B,) int32): sample i is paired with image image_index[i]; i for
    positives, a uniformly drawn j != i for negatives. Needs B >= 2."""
    if batch_size < 2:
        raise ValueError(f"medjax/losses/itm.py itm_pairs: negatives need at least 2 samples, got batch {batch_size}")
    label_rng, partner_rng = jax.random.split(rng)
    labels = (jnp.arange(batch_size) < batch_size // 2).astype(jnp.int32)
    labels = jax.random.permutation(label_rng, labels)
    shift = jax.random.randint(partner_rng, (batch_size,), 1, batch_size)  # 1..B-1: never the sample itself
    index = jnp.arange(batch_size)
    return labels, jnp.where(labels == 1, index, (index + shift) % batch_size).astype(jnp.int32)


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean 2-way cross-entropy; logits (B, 2), labels (B,) in {0, 1}."""
    if logits.ndim != 2 or logits.shape[-1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"medjax/losses/itm.py itm_loss: expected logits (batch, 2) and labels (batch,), got "
                         f"{logits.shape} and {labels.shape}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def itm_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
