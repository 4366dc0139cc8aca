"""fVLM's organ-level soft-target image-report contrast (Shui et al., "Large-scale and Fine-grained
Vision-language Pre-training for Enhanced CT Image Understanding", ICLR 2025, Sec. 3.2-3.3; the
`BlipPretrain.forward` loss of the original code), also ViSD-Boost's stage-3 objective (ICCV 2025).

For every organ o, over the samples of the (global) batch whose organ o lies wholly in the crop
("intact"), with L2-normalised image embeddings V and text embeddings T:

    logits_i2t = V T^T / temp,   logits_t2i = T V^T / temp
    B_ik = [normal_i and normal_k] or [text_i == text_k],   B_ii = 0       (false negatives as positives)
    S = I + B,  rows normalised to sum 1                                    (soft targets)
    CE(S, Z) = -1/n sum_i sum_k S_ik log softmax_k(Z_ik)                    (n = intact samples of o)
    L_o = 1/2 (CE(S, logits_i2t) + CE(S, logits_t2i)),      total = sum_o L_o

Skip rules of the reference: an organ takes part only when the batch holds at least one abnormal intact
sample of it (`organ_status_world`); and, as the original's `len(torch.unique(sim_targets)) == 1`, an organ
whose soft targets are all equal is skipped too (it happens when at most one sample is intact, or when
all intact samples share one text). Static shapes under `jax.jit`: every organ is computed over the whole
batch, with the non-intact samples masked out of the logits (columns) and out of the mean (rows), and
skipped organs multiplied by zero, so the value and gradient equal the reference's computation on the
gathered subset. Computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # masked logits: exp underflows to exactly 0


def _check_shapes(image_emb, text_emb, normal, text_ids, intact) -> None:
    if image_emb.ndim != 3 or image_emb.shape != text_emb.shape:
        raise ValueError("medjax/losses/organ_contrastive.py fvlm_organ_loss: expected image_emb and text_emb of "
                         f"one shape (organs, batch, dim), got {image_emb.shape} and {text_emb.shape}")
    for name, value in (("normal", normal), ("text_ids", text_ids), ("intact", intact)):
        if tuple(value.shape) != tuple(image_emb.shape[:2]):
            raise ValueError(f"medjax/losses/organ_contrastive.py fvlm_organ_loss: {name} must be (organs, batch) = "
                             f"{tuple(image_emb.shape[:2])}, got {tuple(value.shape)}")


def organ_soft_targets(normal: jax.Array, text_ids: jax.Array, intact: jax.Array) -> jax.Array:
    """S of fVLM per organ, (organs, batch, batch): I + B restricted to intact samples, rows normalised.

    B_ik = [normal_i and normal_k] or [text_ids_i == text_ids_k], zero on the diagonal. Rows and columns
    of non-intact samples are zero."""
    normal, intact = normal.astype(bool), intact.astype(bool)
    batch = normal.shape[-1]
    eye = jnp.eye(batch, dtype=bool)
    related = (normal[:, :, None] & normal[:, None, :]) | (text_ids[:, :, None] == text_ids[:, None, :])
    pair_valid = intact[:, :, None] & intact[:, None, :]
    targets = ((related & ~eye) | eye) & pair_valid
    targets = targets.astype(jnp.float32)
    return targets / jnp.maximum(targets.sum(-1, keepdims=True), 1.0)


def _mean_over_intact(per_row: jax.Array, intact: jax.Array) -> jax.Array:
    """(organs,) mean of per-row values (organs, batch) over each organ's intact samples (0 for none)."""
    return jnp.sum(jnp.where(intact, per_row, 0.0), axis=-1) / jnp.maximum(intact.sum(-1), 1)


def organ_target_entropy(normal: jax.Array, text_ids: jax.Array, intact: jax.Array, taken: jax.Array) -> jax.Array:
    """The lowest value the summed organ loss can take on this batch: the sum over the taken organs (`organ_losses`)
    of the soft-target rows' mean entropy. CE(S, Z) >= H(S) per row, so the loss falls from organs x ln(batch)
    (uniform) towards this, never to 0 when normal organs share targets. Inputs (organs, batch), as the loss's."""
    intact = jnp.asarray(intact, bool)
    s = organ_soft_targets(normal, text_ids, intact)
    rows = -jnp.sum(jnp.where(s > 0, s * jnp.log(jnp.where(s > 0, s, 1.0)), 0.0), axis=-1)
    return jnp.sum(jnp.where(taken, _mean_over_intact(rows, intact), 0.0))


def organ_losses(image_emb: jax.Array, text_emb: jax.Array, normal: jax.Array, text_ids: jax.Array,
                 intact: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """(L_o per organ, (organs,), zero where skipped; taken (organs,) bool): the terms of `fvlm_organ_loss`."""
    _check_shapes(image_emb, text_emb, normal, text_ids, intact)
    normal, intact = jnp.asarray(normal, bool), jnp.asarray(intact, bool)
    image_emb, text_emb = jnp.asarray(image_emb, jnp.float32), jnp.asarray(text_emb, jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    targets = organ_soft_targets(normal, text_ids, intact)
    similarity = jnp.einsum("oid,okd->oik", image_emb, text_emb, precision=jax.lax.Precision.HIGHEST) / temperature
    column_valid = intact[:, None, :]

    def cross_entropy(logits):  # logits (organs, rows, columns); invalid columns and rows masked
        log_probs = jax.nn.log_softmax(jnp.where(column_valid, logits, _NEG), axis=-1)
        return _mean_over_intact(-jnp.sum(jnp.where(targets > 0, targets * log_probs, 0.0), axis=-1), intact)

    loss = 0.5 * (cross_entropy(similarity) + cross_entropy(jnp.swapaxes(similarity, 1, 2)))
    has_abnormal = jnp.any(intact & ~normal, axis=-1)
    # Reference: skip when every entry of S (over the intact block) is one value, i.e. S is uniform.
    pair_valid = intact[:, :, None] & intact[:, None, :]
    first = jnp.max(jnp.where(pair_valid, targets, -jnp.inf), axis=(1, 2))
    lowest = jnp.min(jnp.where(pair_valid, targets, jnp.inf), axis=(1, 2))
    taken = has_abnormal & (first != lowest)
    return jnp.where(taken, loss, 0.0), taken


def fvlm_organ_loss(image_emb: jax.Array, text_emb: jax.Array, normal: jax.Array, text_ids: jax.Array,
                    intact: jax.Array, temperature) -> jax.Array:
    """Sum over organs of fVLM's soft-target InfoNCE (module docstring).

    image_emb, text_emb: (organs, batch, dim), L2-normalised; normal, intact: (organs, batch) bool;
    text_ids: (organs, batch) int, equal id = identical report text; temperature: scalar divisor."""
    losses, _ = organ_losses(image_emb, text_emb, normal, text_ids, intact, temperature)
    return jnp.sum(losses)
