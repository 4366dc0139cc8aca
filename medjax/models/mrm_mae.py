"""The MRM paper's MAE baseline as the authors' repository ships it (CityU-AIM-Group/MRM `models_mrm.py`
is plain MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3):

    keep = a uniformly random 25% of the patches per image (argsort of uniform noise, MAE's
    `random_masking`); encoder = ViT on [cls + pos_0; kept patches + their positions] (fixed 2D sin-cos);
    decoder = Linear -> [cls; kept; mask tokens] unshuffled + fixed sin-cos positions -> 8 blocks of
    512 -> LayerNorm -> Linear(p^2 * 3); loss = MSE on the masked patches (medjax.losses.reconstruction).

The encoder is named `image_encoder` as MRM's, so the transfer tasks (`mrm_aptos`, `init=`) load either.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.sincos import sincos_2d
from medjax.nn.vit import EncoderBlock, ViTEncoder, layer_norm

Dtype = Any


def random_keep(rng: jax.Array, batch: int, num_patches: int, keep: int) -> tuple[jax.Array, jax.Array]:
    """MAE's `random_masking`: (ids_keep (B, keep), ids_restore (B, N)) from the argsort of uniform noise."""
    noise = jax.random.uniform(rng, (batch, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1)
    return ids_shuffle[:, :keep], jnp.argsort(ids_shuffle, axis=1)


class MAE(nn.Module):
    """Returns {"pred": (B, N, p^2 C) per patch, "mask": (B, N) 1 = masked (the loss counts these)}."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    pos_embed: str = "sincos"  # MAE's fixed encoder table ("learned": trained N(0, 0.02))
    remat: bool | str = "none"
    scan: bool | str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"medjax/models/mrm_mae.py MAE.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        encoder = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
                             class_token=True, remat=self.remat, scan=self.scan,
                             pos_embed_init="sincos" if self.pos_embed == "sincos" else "normal", **kinds,
                             name="image_encoder")
        tokens = encoder.embed(images)  # (B, 1 + N, width), positions added
        b, n = tokens.shape[0], tokens.shape[1] - 1
        keep = int(n * (1 - self.mask_ratio))
        ids_keep, ids_restore = random_keep(self.make_rng("masking"), b, n, keep)
        kept = jnp.take_along_axis(tokens[:, 1:], ids_keep[..., None], axis=1)
        latent = encoder.encode(jnp.concatenate([tokens[:, :1], kept], axis=1), train=train)

        x = nn.Dense(self.decoder_width, name="decoder_embed", **kinds)(latent)
        mask_token = self.param("mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                           (None, None, "embed")),
                                (1, 1, self.decoder_width), self.param_dtype)
        patches = jnp.concatenate([x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype),
                                                               (b, n - keep, self.decoder_width))], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)  # unshuffle
        grid = self.image_size // self.patch_size
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        x = x + jnp.asarray(sincos_2d(self.decoder_width, grid, class_token=True), x.dtype)[None]  # fixed (MAE)
        for i in range(self.decoder_depth):
            x = EncoderBlock(self.decoder_heads, self.mlp_ratio, **kinds, name=f"decoder_block_{i}")(x, train=train)
        x = layer_norm(self.dtype, self.param_dtype, "decoder_norm")(x)
        pred = nn.Dense(self.patch_size ** 2 * images.shape[-1], name="decoder_pred", **kinds)(x)[:, 1:]
        mask = jnp.ones((b, n), jnp.float32).at[jnp.arange(b)[:, None], ids_keep].set(0.0)
        return {"pred": pred.astype(jnp.float32), "mask": mask}
