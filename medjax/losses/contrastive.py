"""Image-text contrastive loss (InfoNCE in both directions; van den Oord et al., 2018; CLIP, Radford et
al., 2021, Fig. 3), as PTUnifier's ITC objective (Chen et al., ICCV 2023, Sec. 3.4; `ITCHead` of the
original code) with a FIXED temperature (0.1 in the paper's configuration):

    u_i = f_i / |f_i|,  v_j = g_j / |g_j|,   S_ij = u_i . v_j / tau
    L = 1/2 [ CE(S, diag) + CE(S^T, diag) ],   CE(S, diag) = -1/B sum_i log softmax_j(S_ij)|_{j=i}

Global batch: under `jax.jit` the arrays passed here are the global (batch-sharded) arrays, so the
B x B similarity matrix spans every device's samples, the all-gather of the original's `allgather`
(XLA inserts the collectives). The value equals the original's per-rank loss; the gradient is that of
this global loss (the original's DDP average of per-rank gradients is 1/world_size of it). Computed in
float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_logits(image_embeds: jax.Array, text_embeds: jax.Array, temperature: float) -> jax.Array:
    """S = normalize(image) normalize(text)^T / temperature, (B_image, B_text), row i = image i."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(f"medjax/losses/contrastive.py: expected image and text embeddings (batch, dim) of one dim, "
                         f"got {image_embeds.shape} and {text_embeds.shape}")
    if not temperature > 0:
        raise ValueError(f"medjax/losses/contrastive.py: temperature must be positive, got {temperature}")
    similarity = jnp.einsum("id,jd->ij", l2_normalize(image_embeds), l2_normalize(text_embeds),
                            precision=jax.lax.Precision.HIGHEST)
    return similarity / temperature


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, temperature: float = 0.1) -> jax.Array:
    """Symmetric InfoNCE over matched pairs (image i <-> text i): mean of image->text and text->image CE."""
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"medjax/losses/contrastive.py contrastive_loss: {image_embeds.shape[0]} images but "
                         f"{text_embeds.shape[0]} texts; pairs must align")
    logits = contrastive_logits(image_embeds, text_embeds, temperature)
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (image_to_text + text_to_image)


def contrastive_accuracy(image_embeds: jax.Array, text_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image->text, text->image) top-1 accuracy within the batch (argmax ties: the lower index)."""
    logits = contrastive_logits(image_embeds, text_embeds, 1.0)
    target = jnp.arange(logits.shape[0])
    return (jnp.mean(jnp.argmax(logits, axis=1) == target).astype(jnp.float32),
            jnp.mean(jnp.argmax(logits, axis=0) == target).astype(jnp.float32))


def clip_contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE with a LEARNED temperature (Radford et al., 2021, Fig. 3; ConVIRT): S = s *
    normalize(image) normalize(text)^T with `logit_scale` s = exp(learned log-scale), already clamped by the
    caller (CLIP: at 100); the mean of the image->text and text->image cross-entropies on the diagonal."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"medjax/losses/contrastive.py clip_contrastive_loss: expected matched (batch, dim) image and "
                         f"text embeddings, got {image_embeds.shape} and {text_embeds.shape}")
    logits = jnp.einsum("id,jd->ij", l2_normalize(image_embeds), l2_normalize(text_embeds),
                        precision=jax.lax.Precision.HIGHEST) * jnp.asarray(logit_scale, jnp.float32)
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (image_to_text + text_to_image)
