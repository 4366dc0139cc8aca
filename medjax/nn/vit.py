"""The Vision Transformer of medjax (Dosovitskiy et al., ICLR 2021), pre-norm as in big_vision.

One `ViTEncoder` serves every paper: `__call__` embeds images and runs the blocks; `embed` and
`encode` split the two halves so that a model (e.g. MRM, Sec. 3.2.2) can run the same blocks, with
the same parameters, on tokens it computed itself. `EncoderBlock` also takes an optional
cross-attention input and an MRM relation-masking ratio, so one block class serves plain,
self-relation-masked and cross-relation-masked Transformer blocks.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.attention import MultiHeadAttention

Dtype = Any
TOKENS = ("batch", "length", "embed")

# big_vision models/vit.py `decode_variant`: width, depth, heads (MLP is 4x width for all of them).
_VARIANTS = {
    "Ti": (192, 12, 3), "S": (384, 12, 6), "M": (512, 12, 8),
    "B": (768, 12, 12), "L": (1024, 24, 16), "H": (1280, 32, 16),
}


def vit_variant(name: str) -> dict:
    """ViTEncoder fields for a variant string "B" or "B/16" (big_vision's table)."""
    match = re.fullmatch(r"(\w+?)(?:/(\d+))?", name)
    if match is None or match.group(1) not in _VARIANTS:
        raise ValueError(f"medjax/nn/vit.py vit_variant: unknown variant {name!r}; expected one of "
                         f"{sorted(_VARIANTS)} optionally followed by /<patch>, e.g. 'B/16'")
    width, depth, heads = _VARIANTS[match.group(1)]
    fields = {"width": width, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0}
    if match.group(2):
        fields["patch_size"] = int(match.group(2))
    return fields


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm, eps 1e-6 (big_vision/MAE), scale and bias on the logical axis "embed"."""
    return nn.LayerNorm(1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(batch, H, W, C) -> (batch, N, patch*patch*C), MAE's order: row-major patches, pixels (p, q, c)."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"medjax/nn/vit.py patchify: image size {(h, w)} is not a multiple of patch {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int] | None = None) -> jax.Array:
    """Inverse of `patchify`; `grid` = (rows, cols) of patches, square when None."""
    b, n, d = patches.shape
    if grid is None:
        side = int(round(n ** 0.5))
        grid = (side, side)
    if grid[0] * grid[1] != n or d % (patch * patch):
        raise ValueError(f"medjax/nn/vit.py unpatchify: {n} patches of {d} values do not form a {grid} grid "
                         f"of {patch}x{patch} patches")
    c = d // (patch * patch)
    x = patches.reshape(b, grid[0], grid[1], patch, patch, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, grid[0] * patch, grid[1] * patch, c)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: a conv with stride = kernel = patch (ViT Eq. 1)."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, "channels", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                    name="proj")(images)
        return x.reshape(x.shape[0], -1, self.width)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> GELU -> Dense (ViT Eq. 3)."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = lambda features, axes, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), axes[1:]), name=name)
        x = dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return dense(width, ("mlp", "embed"), "fc2")(x)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drops a sample's residual branch with prob `rate`."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)[, LN(x_kv)]), then x + mlp(LN(x)).

    With `relation_mask_ratio > 0` the attention is MRM's relation masking (Sec. 3.2.1): a
    self-modality block when `x_kv` is None, a cross-modality block when `x_kv` is given.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    layerscale_init: float | None = None  # CaiT LayerScale; None disables it
    relation_mask_ratio: float = 0.0
    kernel_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _layer_scale(self, x: jax.Array, name: str) -> jax.Array:
        if self.layerscale_init is None:
            return x
        gamma = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.layerscale_init), ("embed",)), (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, x_kv: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        x = nn.with_logical_constraint(x, TOKENS)
        norm = lambda name: layer_norm(self.dtype, self.param_dtype, name)  # noqa: E731
        y = norm("norm1")(x)
        kv = None if x_kv is None else norm("norm_kv")(nn.with_logical_constraint(x_kv, TOKENS))
        y = MultiHeadAttention(self.num_heads, relation_mask_ratio=self.relation_mask_ratio,
                               kernel_impl=self.kernel_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="attn")(y, kv)
        x = x + DropPath(self.drop_path, name="drop_path1")(self._layer_scale(y, "ls1"), train=train)
        y = MlpBlock(int(self.mlp_ratio * x.shape[-1]), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="mlp")(norm("norm2")(x))
        x = x + DropPath(self.drop_path, name="drop_path2")(self._layer_scale(y, "ls2"), train=train)
        return nn.with_logical_constraint(x, TOKENS)


class _RematEncoderBlock(EncoderBlock):
    """EncoderBlock with `train` positional, so `nn.remat` can hold it static (argnum 3, self = 0)."""

    def __call__(self, x, x_kv, train):  # type: ignore[override]
        return super().__call__(x, x_kv, train=train)


RematEncoderBlock = nn.remat(_RematEncoderBlock, static_argnums=(3,))


class ViTEncoder(nn.Module):
    """Patch embedding + learned position embedding (+ class token), pre-norm blocks, final LN.

    Returns all tokens (batch, [1 +] N, width). Stochastic depth grows linearly over the blocks
    up to `drop_path` (DeiT/MAE schedule).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = True
    drop_path: float = 0.0
    layerscale_init: float | None = None
    remat: bool = False  # recompute each block's activations in the backward pass (memory for FLOPs)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: num_heads={self.num_heads} must divide width={self.width}")
        self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype, self.param_dtype)
        if self.class_token:
            self.cls_token = self.param("cls_token", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, self.width), self.param_dtype)
        self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.num_patches + int(self.class_token), self.width), self.param_dtype)
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
        block = RematEncoderBlock if self.remat else EncoderBlock
        self.blocks = [block(self.num_heads, self.mlp_ratio, float(rate), self.layerscale_init,
                             dtype=self.dtype, param_dtype=self.param_dtype) for rate in rates]
        self.norm = layer_norm(self.dtype, self.param_dtype)

    def embed(self, images: jax.Array) -> jax.Array:
        """Images (batch, H, W, C) -> tokens z^0 (batch, [1 +] N, width) with position embeddings."""
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.embed: expected images (batch, {self.image_size}, "
                             f"{self.image_size}, channels), got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))
        if self.class_token:
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        return nn.with_logical_constraint(x + self.pos_embed.astype(x.dtype), TOKENS)

    def encode(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """The Transformer blocks and the final LayerNorm on already-embedded tokens."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.width:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.encode: expected tokens (batch, tokens, {self.width}), "
                             f"got {tokens.shape}")
        for block in self.blocks:
            tokens = block(tokens, None, train) if self.remat else block(tokens, train=train)
        return self.norm(tokens)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.encode(self.embed(images), train=train)
