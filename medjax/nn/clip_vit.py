"""CLIP ViT image tower (Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4 and Fig. 3), matching OpenAI's `VisionTransformer` and Hugging Face's
`CLIPVisionModel` (transformers 5.23) number for number.

    x = [class_embedding; patches(images) @ W_patch] + position_embedding   (ViT Eq. 1, conv without bias)
    x = ln_pre(x)                        # CLIP's extra pre-LayerNorm (Sec. 2.4)
    x = pre-norm Transformer blocks(x)   # QuickGELU MLP: x * sigmoid(1.702 x)
    last_hidden_state = x;  pooled = ln_post(x[:, 0]);  image_embeds = pooled @ W_proj

At another image size the patch-grid position embeddings are resized bicubically (PyTorch's
`interpolate(mode="bicubic", align_corners=False)`, as HF's `interpolate_pos_encoding` and METER /
PTUnifier do); the class position is kept.

The blocks are `medjax.nn.transformer.TransformerBlock`s with CLIP's names (`clip_layer_fields`), shared
with `medjax.nn.clip_text`; `scan=True` runs them as one nn.scan (params under `layers`, leading layer axis).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn import layer_stack, transformer
from medjax.nn.transformer import ACTIVATIONS, TOKENS, dense  # noqa: F401  (re-exported names)
from medjax.nn.vit import patchify, position_resize_matrix, resize_patch_positions

Dtype = Any


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config's `hidden_act` names (`transformer.ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"medjax/nn/clip_vit.py activation: hidden_act {name!r} is not supported; "
                         f"expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with the config's epsilon; scale and bias on the logical axis "embed" (transformer.layer_norm)."""
    return transformer.layer_norm(dtype, param_dtype, name, eps=eps)


def clip_layer_fields(num_heads: int, mlp_dim: int, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
                      attention_dropout: float = 0.0) -> dict:
    """`transformer.TransformerBlock` fields of CLIP's pre-norm block (CLIP `ResidualAttentionBlock`, HF
    `CLIPEncoderLayer`): x + attn(ln_1(x), mask), then x + fc2(act(fc1(ln_2(x)))), QuickGELU; params ln_1,
    attn/{query,key,value,out}, ln_2, fc1, fc2 (no "mlp" level), zero MLP bias init."""
    return dict(num_heads=num_heads, mlp_dim=mlp_dim, activation=hidden_act, layer_norm_eps=layer_norm_eps,
                attention_dropout=attention_dropout, mlp_bias_std=0.0, norm_names=("ln_1", "ln_2", "ln_kv"),
                mlp_name=None)


# CLIP paper Table 20 (image encoders): width, layers, heads; MLP 4x width.
_VISION_VARIANTS = {"B": (768, 12, 12), "L": (1024, 24, 16)}


def clip_vision_variant(name: str) -> dict:
    """CLIPVisionTransformer fields for "B/32", "B/16", "L/14" (OpenAI CLIP's ViTs)."""
    match = re.fullmatch(r"([BL])/(\d+)", name)
    if match is None:
        raise ValueError(f"medjax/nn/clip_vit.py clip_vision_variant: unknown variant {name!r}; expected "
                         "'B/32', 'B/16' or 'L/14' (size/patch)")
    width, depth, heads = _VISION_VARIANTS[match.group(1)]
    return {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": 4 * width,
            "patch_size": int(match.group(2))}


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`:
    source coordinate (o + 0.5) * in/out - 0.5, four taps clamped to the border, no antialiasing
    (`medjax.nn.vit.position_resize_matrix` with no offset)."""
    return position_resize_matrix(in_size, out_size)


def resize_position_embedding(position_embedding: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(1 + n*n, D) class + square-grid position embeddings -> (1 + rows*cols, D), class position kept."""
    tokens, width = position_embedding.shape
    side = int(round(math.sqrt(tokens - 1)))
    if side * side != tokens - 1:
        raise ValueError(f"medjax/nn/clip_vit.py resize_position_embedding: {tokens - 1} patch positions do not "
                         "form a square grid")
    if (side, side) == tuple(grid):
        return position_embedding
    resized = resize_patch_positions(position_embedding[1:], grid)  # bicubic in float32, as PyTorch
    return jnp.concatenate([position_embedding[:1], resized], axis=0)


class CLIPVisionTransformer(nn.Module):
    """CLIP's image encoder; `__call__(images)` returns HF's `last_hidden_state` (batch, 1 + N, width).

    `pooled_output` gives ln_post of the class token (HF `pooler_output`); `image_embeds` its projection
    (present when `projection_dim` is set). `embed` / `encode` split the forward pass so that a model
    (e.g. PTUnifier's prompt path) can run the blocks on tokens it assembled; `class_token` is the
    class embedding plus its position embedding.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int | None = None
    # nn.scan over the layers: off unless asked, as the Hugging Face / PTUnifier converters (medjax/convert/hf.py,
    # ptunifier.py) map the unrolled layers_{i} layout (None: auto, depth >= 12).
    scan: bool | str | None = False
    remat: bool | str = "none"  # layer_stack.REMAT_POLICIES name or "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"medjax/nn/clip_vit.py CLIPVisionTransformer: image_size={self.image_size} is not a "
                             f"multiple of patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"medjax/nn/clip_vit.py CLIPVisionTransformer: num_heads={self.num_heads} must divide "
                             f"width={self.width}")
        grid = self.image_size // self.patch_size
        # The patch conv (stride = kernel = patch, no bias) as a matmul on (p, q, c)-ordered patch pixels.
        self.patch_embed = dense(self.width, ("patch", "embed"), self.dtype, self.param_dtype, use_bias=False)
        self.class_embedding = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(self.width ** -0.5), ("embed",)), (self.width,), self.param_dtype)
        self.position_embedding = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (grid * grid + 1, self.width), self.param_dtype)
        self.ln_pre = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        # Unrolled: layers_0, layers_1, ...; scanned: one "layers" whose params have a leading layer axis.
        self.layers = layer_stack.block_stack(
            self.depth, [0.0] * self.depth, scan=layer_stack.resolve_scan(self.scan, self.depth),
            remat=layer_stack.resolve_remat(self.remat), dtype=self.dtype, param_dtype=self.param_dtype,
            **clip_layer_fields(self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps,
                                self.attention_dropout))
        self.ln_post = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        if self.projection_dim is not None:
            self.projection = dense(self.projection_dim, ("embed", None), self.dtype, self.param_dtype,
                                    use_bias=False)

    def class_token(self) -> jax.Array:
        """class_embedding + position_embedding[0], shape (width,)."""
        return (self.class_embedding + self.position_embedding[0]).astype(self.dtype)

    def embed(self, images: jax.Array) -> jax.Array:
        """Images (batch, H, W, channels), H and W multiples of the patch -> tokens (batch, 1 + N, width)."""
        if images.ndim != 4 or images.shape[-1] != self.num_channels:
            raise ValueError(f"medjax/nn/clip_vit.py CLIPVisionTransformer.embed: expected images (batch, H, W, "
                             f"{self.num_channels}), got {images.shape}")
        height, width = images.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"medjax/nn/clip_vit.py CLIPVisionTransformer.embed: image size {(height, width)} is "
                             f"not a multiple of patch_size={self.patch_size}")
        x = self.patch_embed(patchify(images.astype(self.dtype), self.patch_size))
        cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        position = resize_position_embedding(
            self.position_embedding, (height // self.patch_size, width // self.patch_size))
        return nn.with_logical_constraint(x + position.astype(x.dtype), TOKENS)

    def encode(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """ln_pre and the Transformer blocks on embedded tokens -> last_hidden_state."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.width:
            raise ValueError(f"medjax/nn/clip_vit.py CLIPVisionTransformer.encode: expected tokens (batch, tokens, "
                             f"{self.width}), got {tokens.shape}")
        x, _ = layer_stack.run_stack(self.layers, self.ln_pre(tokens), [0.0] * self.depth, train=train)
        return x

    def pool(self, last_hidden_state: jax.Array) -> jax.Array:
        """ln_post of the class token: HF's `pooler_output`."""
        return self.ln_post(last_hidden_state[:, 0])

    def project(self, pooled: jax.Array) -> jax.Array:
        if self.projection_dim is None:
            raise ValueError("medjax/nn/clip_vit.py CLIPVisionTransformer: this tower has no projection "
                             "(projection_dim=None); use pooled_output")
        return self.projection(pooled)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        last_hidden_state = self.encode(self.embed(images), train=train)
        if self.is_initializing():  # create ln_post / projection params, used by the other methods
            pooled = self.pool(last_hidden_state)
            if self.projection_dim is not None:
                self.project(pooled)
        return last_hidden_state

    def pooled_output(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(batch, width): HF `CLIPVisionModel(...).pooler_output`."""
        return self.pool(self.encode(self.embed(images), train=train))

    def image_embeds(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(batch, projection_dim): HF `CLIPVisionModelWithProjection(...).image_embeds` (not normalised)."""
        return self.project(self.pooled_output(images, train=train))
