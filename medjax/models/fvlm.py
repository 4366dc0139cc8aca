"""fVLM (Shui et al., "Large-scale and Fine-grained Vision-language Pre-training for Enhanced CT Image
Understanding", ICLR 2025; alibaba-damo-academy/fvlm): organ-level CT-report alignment.

- Vision (`VolumeViT`): a 3D ViT-B without [CLS] (12 layers, 12 heads, width 768, MLP 3072, qkv bias,
  pre-LN, dropout 0.1), patches (16, 16, 32) over (D, H, W): 112 x 256 x 352 -> 7 x 16 x 11 = 1232 tokens,
  learned position embedding (initialisable from a 2D MAE ViT-B: `pos_embed_from_2d`; the whole ViT but
  the patch embedding from MAE's `.pth` by `medjax.convert.mae`).
- Organ tokens (`organ_token_flags`): a token belongs to organ o when any voxel of o lies in its patch
  (max-pool of the organ mask, kernel = stride = patch).
- Organ pooling (`OrganPooling`): keys = the organ's tokens from the outputs of blocks 3, 6, 9 (0-based, as
  the original's `if i in [3, 6, 9]`, before the final norm) and the final normed output, concatenated;
  one zero-initialised query per organ and ONE shared 4-head attention layer; then a per-organ Linear
  768 -> 256 and L2 norm. Static shapes: every organ's query attends over all tokens of all key layers
  with the other organs' tokens masked out ("padded, masked keys"), which equals attention over the
  organ's own tokens alone (tests/models/test_fvlm.py).
- Text: a BERT encoder (CXR-BERT in the paper, `medjax.convert.hf.load`), [CLS] -> Linear -> L2 norm,
  one text per organ.
- Temperature: a learnable divisor `temp`, init 0.07, clamped to [0.001, 0.5] by the task after each step.

Vision layout: volumes (batch, D, H, W, 1); masks (batch, D, H, W) int with 0 = background and organ o
labelled o + 1; tokens in (D, H, W)-major order.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn import layer_stack
from medjax.nn.transformer import TOKENS, MultiHeadAttention, layer_norm

Dtype = Any


def organ_token_flags(masks: jax.Array, num_organs: int, patch: tuple[int, int, int]) -> jax.Array:
    """(batch, D, H, W) organ labels (o + 1 for organ o) -> (batch, organs, tokens) bool: token t holds a voxel
    of organ o (torch `F.max_pool3d(mask_o, kernel_size=patch, stride=patch) > 0`, flattened D-major)."""
    if masks.ndim != 4 or any(s % p for s, p in zip(masks.shape[1:], patch)):
        raise ValueError(f"medjax/models/fvlm.py organ_token_flags: masks (batch, D, H, W) with sides that are "
                         f"multiples of the patch {tuple(patch)} expected, got {masks.shape}")
    b, d, h, w = masks.shape
    pd, ph, pw = patch
    one_hot = masks[..., None] == jnp.arange(1, num_organs + 1, dtype=masks.dtype)  # (b, D, H, W, organs)
    blocks = one_hot.reshape(b, d // pd, pd, h // ph, ph, w // pw, pw, num_organs)
    flags = jnp.any(blocks, axis=(2, 4, 6))  # (b, d', h', w', organs)
    return jnp.moveaxis(flags.reshape(b, -1, num_organs), -1, 1)


def pos_embed_from_2d(pos_embed_2d: np.ndarray, grid_2d: tuple[int, int], grid_3d: tuple[int, int, int]) -> np.ndarray:
    """fVLM's init of the 3D position embedding from a 2D MAE ViT-B's (1, [1 +] rows * cols, C): drop a [CLS]
    entry, resize the patch grid bicubically to (H', W') of the 3D grid and repeat it D' times in depth ->
    (1, D' H' W', C)."""
    pos = np.asarray(pos_embed_2d, np.float32)
    rows, cols = grid_2d
    if pos.shape[1] == rows * cols + 1:
        pos = pos[:, 1:]
    if pos.ndim != 3 or pos.shape[1] != rows * cols:
        raise ValueError(f"medjax/models/fvlm.py pos_embed_from_2d: a (1, [1 +] {rows}x{cols}, C) embedding expected, "
                         f"got {pos.shape}")
    depth, height, width = grid_3d
    grid = jnp.asarray(pos[0].reshape(rows, cols, -1))
    resized = np.asarray(jax.image.resize(grid, (height, width, grid.shape[-1]), "bicubic"))
    return np.broadcast_to(resized[None], (depth, height, width, grid.shape[-1])).reshape(1, -1, grid.shape[-1]).copy()


class VolumeViT(nn.Module):
    """fVLM's 3D ViT: (batch, D, H, W, 1) -> (final normed tokens (batch, N, width), key layers (layers, batch,
    N, width): the outputs of `key_blocks` and the final normed output)."""

    volume_shape: tuple[int, int, int] = (112, 256, 352)
    patch: tuple[int, int, int] = (16, 16, 32)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    key_blocks: tuple[int, ...] = (3, 6, 9)
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.volume_shape, self.patch))

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid))

    def setup(self):
        for size, p in zip(self.volume_shape, self.patch):
            if size % p:
                raise ValueError(f"medjax/models/fvlm.py VolumeViT: volume_shape={tuple(self.volume_shape)} is not a "
                                 f"multiple of patch={tuple(self.patch)}")
        if any(not 0 <= b < self.depth for b in self.key_blocks):
            raise ValueError(f"medjax/models/fvlm.py VolumeViT: key_blocks={tuple(self.key_blocks)} must lie in "
                             f"[0, depth={self.depth})")
        self.patch_embed = nn.Conv(
            self.width, tuple(self.patch), strides=tuple(self.patch), padding="VALID", dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, None, "channels", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
        self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, self.num_tokens, self.width), self.param_dtype)
        self.embed_dropout = nn.Dropout(self.dropout)
        self.blocks = layer_stack.block_stack(
            self.depth, [0.0] * self.depth, scan=False, remat=layer_stack.resolve_remat(self.remat),
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, hidden_dropout=self.dropout, layer_norm_eps=1e-5,
            mlp_bias_std=0.0, dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = layer_norm(self.dtype, self.param_dtype, eps=1e-5)

    def __call__(self, volumes: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        if volumes.ndim != 5 or tuple(volumes.shape[1:4]) != tuple(self.volume_shape):
            raise ValueError(f"medjax/models/fvlm.py VolumeViT: expected volumes (batch, {', '.join(map(str, self.volume_shape))}"
                             f", 1), got {volumes.shape}")
        x = self.patch_embed(volumes.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width) + self.pos_embed.astype(self.dtype)
        x = nn.with_logical_constraint(self.embed_dropout(x, deterministic=not train), TOKENS)
        final, outputs = layer_stack.run_stack(self.blocks, x, [0.0] * self.depth, train=train, collect=True)
        final = self.norm(final)
        keys = jnp.concatenate([outputs[jnp.asarray(self.key_blocks)], final[None]], axis=0)
        return final, keys


def volume_vit_from_config(m, crop_shape, dtype: Dtype = jnp.float32) -> VolumeViT:
    """The VolumeViT of an fVLM config's `model` block on crops of `crop_shape` (the task and the MAE converter)."""
    return VolumeViT(volume_shape=tuple(int(s) for s in crop_shape), patch=tuple(m.patch), width=m.width,
                     depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout=m.dropout,
                     key_blocks=tuple(m.key_blocks), remat=m.remat, dtype=dtype)


class OrganPooling(nn.Module):
    """One query per organ over its tokens of every key layer (shared attention, padded and masked keys),
    then the organ's own Linear -> `embed_dim` (module docstring). keys (layers, batch, N, width), flags
    (batch, organs, N) -> (batch, organs, embed_dim), not normalised."""

    num_organs: int = 4
    num_heads: int = 4
    embed_dim: int = 256
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, keys: jax.Array, flags: jax.Array, *, train: bool = False) -> jax.Array:
        layers, batch, tokens, width = keys.shape
        if flags.shape != (batch, self.num_organs, tokens):
            raise ValueError(f"medjax/models/fvlm.py OrganPooling: flags must be (batch, organs, tokens) = "
                             f"{(batch, self.num_organs, tokens)}, got {flags.shape}")
        query = self.param("query_tokens", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "embed")),
                           (self.num_organs, width), self.param_dtype)
        kv = jnp.moveaxis(keys, 0, 1).reshape(batch, layers * tokens, width)
        mask = jnp.tile(flags, (1, 1, layers))[:, None]  # (batch, 1 head, organs, layers * tokens)
        q = jnp.broadcast_to(query.astype(self.dtype)[None], (batch, self.num_organs, width))
        pooled = MultiHeadAttention(self.num_heads, dropout_rate=self.dropout, fused=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="attention")(q, kv, mask, train=train)
        kernel = self.param("proj_kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(batch_axis=(0,)), (None, "embed", None)),
            (self.num_organs, width, self.embed_dim), self.param_dtype)
        bias = self.param("proj_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)),
                          (self.num_organs, self.embed_dim), self.param_dtype)
        return jnp.einsum("bow,owe->boe", pooled, kernel.astype(self.dtype)) + bias.astype(self.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class FVLM(nn.Module):
    """Vision + organ pooling + text tower. `image_embeddings(volumes, masks)` -> (batch, organs, E);
    `text_embeddings(input_ids, attention_mask)` of (batch, organs, T) -> (batch, organs, E); both L2-normed."""

    vision: nn.Module
    text: nn.Module
    num_organs: int = 4
    pool_heads: int = 4
    embed_dim: int = 256
    init_temperature: float = 0.07
    dtype: Dtype = jnp.float32

    def setup(self):
        self.pooling = OrganPooling(self.num_organs, self.pool_heads, self.embed_dim, dtype=self.dtype)
        self.text_proj = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", None)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None,)))
        self.temp = self.param("temp", nn.with_logical_partitioning(
            nn.initializers.constant(self.init_temperature), ()), (), jnp.float32)

    def image_embeddings(self, volumes, masks, *, train: bool = False):
        _, keys = self.vision(volumes, train=train)
        flags = organ_token_flags(masks, self.num_organs, tuple(self.vision.patch))
        return l2_normalize(self.pooling(keys, flags, train=train))

    def text_embeddings(self, input_ids, attention_mask, *, train: bool = False):
        b, o, t = input_ids.shape
        hidden = self.text(input_ids.reshape(b * o, t), attention_mask.reshape(b * o, t), train=train)
        return l2_normalize(self.text_proj(hidden[:, 0])).reshape(b, o, -1)

    def temperature(self):
        return self.temp

    def __call__(self, volumes, masks, input_ids, attention_mask, *, train: bool = False):
        return (self.image_embeddings(volumes, masks, train=train),
                self.text_embeddings(input_ids, attention_mask, train=train), self.temp)
