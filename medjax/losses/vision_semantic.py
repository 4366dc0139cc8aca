"""ViSD-Boost's vision semantic enhancement (Cao et al., ICCV 2025, Sec. 3.2; described in the paper only, the
training code was never released): per-organ contrast of two augmented views against a momentum encoder,
with anatomy normality deciding the positives.

For organ o over the samples whose organ is intact in both views, online embeddings Q (view a / b) and
momentum embeddings K (other view, no gradient), all L2-normalised:

    P_ik = [normal_i and normal_k] or [i == k]        normal organs are positives of each other; an abnormal
                                                      organ's only positive is its own other view
    L_o(Q, K) = fVLM's soft-target InfoNCE with targets P (medjax.losses.organ_contrastive.organ_losses:
                rows normalised, both directions Q K^T and K Q^T, the same skip rules)
    loss = sum_o 1/2 (L_o(Q_a, K_b) + L_o(Q_b, K_a))

That P is fVLM's S with every sample's text taken as distinct (`text_ids` = the sample index). Our choices
where the paper is silent: the symmetric two-view form, a fixed temperature (0.07 by default), and fVLM's
skip rules (an organ without an abnormal sample in the batch has all-positive targets and is skipped).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.losses.organ_contrastive import organ_losses, organ_soft_targets


def distinct_ids(normal: jax.Array) -> jax.Array:
    """(organs, batch) ids that differ for every sample: no two samples count as the same text."""
    return jnp.broadcast_to(jnp.arange(normal.shape[-1], dtype=jnp.int32), normal.shape)


def vision_semantic_targets(normal: jax.Array, valid: jax.Array) -> jax.Array:
    """P per organ (organs, batch, batch), rows normalised, zero outside the valid samples."""
    return organ_soft_targets(normal, distinct_ids(normal), valid)


def vision_semantic_losses(online_a, online_b, momentum_a, momentum_b, normal, valid, temperature
                           ) -> tuple[jax.Array, jax.Array]:
    """(1/2 (L_o(Q_a, K_b) + L_o(Q_b, K_a)) per organ (organs,), taken (organs,) bool); embeddings
    (organs, batch, dim), normal / valid (organs, batch) bool. The momentum embeddings get no gradient."""
    ids = distinct_ids(normal)
    momentum_a, momentum_b = jax.lax.stop_gradient(momentum_a), jax.lax.stop_gradient(momentum_b)
    first, taken = organ_losses(online_a, momentum_b, normal, ids, valid, temperature)
    second, _ = organ_losses(online_b, momentum_a, normal, ids, valid, temperature)
    return 0.5 * (first + second), taken


def vision_semantic_loss(online_a, online_b, momentum_a, momentum_b, normal, valid, temperature=0.07) -> jax.Array:
    """Sum over organs of the vision semantic enhancement loss (module docstring)."""
    return jnp.sum(vision_semantic_losses(online_a, online_b, momentum_a, momentum_b, normal, valid, temperature)[0])
