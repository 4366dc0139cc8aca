"""Reconstruction losses: MAE's pixel target (He et al., CVPR 2022, Sec. 3) and MRM's
L_recon = ||h_I(z_I^F) - x_I||^2 + ||h_G(z_G^F) - x_G||^2 (Yang et al., ICCV 2023, Sec. 3.2.2).

The paper's squared norms are taken as means over elements (MAE's convention), so the two terms
do not scale with image size or SNP count. Computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.nn.vit import patchify


def masked_image_mse(pred: jax.Array, images: jax.Array, patch_size: int, *, norm_pix_loss: bool,
                     patch_mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error between predicted patches and the patchified images.

    pred: (batch, N, patch_size^2 * C); images: (batch, H, W, C). With `norm_pix_loss` each target
    patch is normalised by its own mean and unbiased variance, (t - mean) / sqrt(var + 1e-6), as
    in MAE's `forward_loss`. `patch_mask` (batch, N), 1 = counts, averages the per-patch errors
    over the masked patches as MAE does; MRM masks relations, not patches, so it passes None and
    every patch counts.
    """
    target = patchify(images.astype(jnp.float32), patch_size)
    if pred.shape != target.shape:
        raise ValueError(f"medjax/losses/reconstruction.py masked_image_mse: pred {pred.shape} does not match "
                         f"the patchified images {target.shape} (patch_size={patch_size})")
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    if patch_mask is None:
        return jnp.mean(per_patch)
    if patch_mask.shape != per_patch.shape:
        raise ValueError(f"medjax/losses/reconstruction.py masked_image_mse: patch_mask {patch_mask.shape} must be "
                         f"(batch, N) = {per_patch.shape}")
    patch_mask = patch_mask.astype(jnp.float32)
    return jnp.sum(per_patch * patch_mask) / jnp.maximum(jnp.sum(patch_mask), 1.0)


def genome_mse(pred: jax.Array, genome: jax.Array) -> jax.Array:
    """Mean squared error between predicted and true SNP dosages, both (batch, num_snps)."""
    if pred.shape != genome.shape:
        raise ValueError(f"medjax/losses/reconstruction.py genome_mse: pred {pred.shape} != genome {genome.shape}")
    return jnp.mean((pred.astype(jnp.float32) - genome.astype(jnp.float32)) ** 2)
