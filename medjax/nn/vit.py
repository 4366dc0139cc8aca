"""The Vision Transformer of medjax (Dosovitskiy et al., ICLR 2021), pre-norm as in big_vision.

One `ViTEncoder` serves every paper: `__call__` embeds images and runs the blocks; `embed` and
`encode` split the two halves so that a model (e.g. MRM, Sec. 3.2.2) can run the same blocks, with
the same parameters, on tokens it computed itself. `EncoderBlock` also takes an optional
cross-attention input and an MRM relation-masking ratio, so one block class serves plain,
self-relation-masked and cross-relation-masked Transformer blocks.

For DINOv2 (Oquab et al., TMLR 2024; `dinov2/models/vision_transformer.py`) the encoder also has
register tokens (Darcet et al., ICLR 2024), a learned iBOT mask token that replaces masked patch
embeddings, uniform stochastic depth, and `dynamic_image_size`: images of another size get the
position embeddings resized bicubically with DINOv2's `interpolate_pos_encoding` semantics
(`position_resize_matrix`). `features` returns DINOv2's `x_norm_clstoken` / `x_norm_patchtokens`.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn import layer_stack, transformer
from medjax.nn.sincos import sincos_2d
from medjax.nn.transformer import TOKENS, DropPath, TransformerBlock

Dtype = Any
# The ViT block is the shared pre-norm block: norm1, attn, [ls1], norm2, mlp/fc1, mlp/fc2, [ls2]
# (timm / big_vision names), GELU MLP, optional cross-attention (norm_kv) and MRM relation masking.
EncoderBlock = TransformerBlock
__all__ = ["DropPath", "EncoderBlock", "PatchEmbed", "TOKENS", "ViTEncoder", "layer_norm", "patchify",
           "position_resize_matrix", "resize_patch_positions", "unpatchify", "vit_variant"]

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
    return transformer.layer_norm(dtype, param_dtype, name, eps=1e-6)


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


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel (PyTorch: a = -0.75 for bicubic, -0.5 for antialiased bicubic)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def position_resize_matrix(in_size: int, out_size: int, *, offset: float = 0.0,
                           antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) matrix of PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`
    along one axis, as DINOv2's `interpolate_pos_encoding` calls it.

    offset > 0: DINOv2 passes `scale_factor=(out + offset) / in` (a kludge from DINO issue #8), so the
    output has floor(in * scale) = out positions but samples source coordinates (o + 0.5) / scale - 0.5
    -- slightly off the plain resize, which `offset=0` gives (`size=out`, scale in/out).
    antialias=False: four taps at A = -0.75, indices clamped to the border. antialias=True (timm's
    `resample_abs_pos_embed`, PIL-style): when shrinking, the a = -0.5 kernel is stretched by the scale
    and each row renormalised; taps outside the input are dropped.
    """
    if offset:
        scale = 1.0 / ((out_size + offset) / in_size)
        if math.floor(in_size / scale) != out_size:
            raise ValueError(f"medjax/nn/vit.py position_resize_matrix: offset {offset} gives "
                             f"{math.floor(in_size / scale)} positions, not {out_size}")
    else:
        scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        for o in range(out_size):
            source = (o + 0.5) * scale - 0.5
            start = math.floor(source)
            taps = start - 1 + np.arange(4)
            np.add.at(matrix[o], np.clip(taps, 0, in_size - 1), _keys_cubic(taps - source, -0.75))
        return matrix
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / max(scale, 1.0)
    for o in range(out_size):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = _keys_cubic((taps - center + 0.5) * inv_scale, -0.5)
        matrix[o, lo:hi] = weights / weights.sum()
    return matrix


def resize_patch_positions(positions: jax.Array, grid: tuple[int, int], *, offset: float = 0.0,
                           antialias: bool = False) -> jax.Array:
    """(N, D) position embeddings of a square patch grid -> (rows * cols, D) for `grid` = (rows, cols),
    bicubic in float32 (`position_resize_matrix` along each axis)."""
    n, width = positions.shape
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"medjax/nn/vit.py resize_patch_positions: {n} patch positions do not form a square grid")
    if (side, side) == tuple(grid):
        return positions
    rows = jnp.asarray(position_resize_matrix(side, grid[0], offset=offset, antialias=antialias), jnp.float32)
    cols = jnp.asarray(position_resize_matrix(side, grid[1], offset=offset, antialias=antialias), jnp.float32)
    resized = jnp.einsum("ri,ijd,cj->rcd", rows, positions.reshape(side, side, width).astype(jnp.float32), cols,
                         precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(grid[0] * grid[1], width).astype(positions.dtype)


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


class ViTEncoder(nn.Module):
    """Patch embedding + learned position embedding (+ class token, + register tokens), pre-norm blocks,
    final LN.

    Returns all tokens (batch, [1 +] [registers +] N, width). Stochastic depth grows linearly over the
    blocks up to `drop_path` (DeiT/MAE schedule), or is `drop_path` in every block with
    `drop_path_uniform` (DINOv2 ViT-L/g). With `dynamic_image_size` any image whose sides are multiples
    of the patch is accepted and the position embeddings are resized (module doc); otherwise the image
    must be `image_size` square. DINOv2's token order: [cls, registers, patches]; registers get no
    position embedding; with `no_embed_class` (timm) neither does the class token.

    Layout: unrolled, the blocks are `blocks_0`, `blocks_1`, ...; with `scan` (None: depth >= 12) they are one
    nn.scan module `blocks` whose params have the layer on axis 0 (logical axis "layers"), so ViT-L/24
    compiles one block. `medjax.nn.transformer.stack_layers` / `unstack_layers` convert between the two.
    `remat` names a recomputation policy for each block (layer_stack.REMAT_POLICIES; True = "full").
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
    remat: bool | str = "none"  # layer_stack.REMAT_POLICIES name, "none" (or a bool: True = "full")
    scan: bool | str | None = None  # nn.scan over the blocks (params under "blocks"); None: depth >= 12
    num_register_tokens: int = 0  # Darcet et al. 2024 "registers" (DINOv2 `num_register_tokens`)
    use_mask_token: bool = False  # a learned iBOT mask token (DINOv2 `mask_token`, zeros at init)
    pos_embed_init: str = "normal"  # "sincos": MAE's fixed 2D sin-cos table as the value (medjax.nn.sincos)
    drop_path_uniform: bool = False  # DINOv2 `drop_path_uniform`: the same rate in every block
    dynamic_image_size: bool = False  # accept other image sizes, resizing the position embeddings
    interpolate_offset: float = 0.1  # DINOv2 `interpolate_offset` (0: plain resize to the grid)
    interpolate_antialias: bool = False  # DINOv2 `interpolate_antialias` (timm uses True)
    mlp_activation: str = "gelu"  # or "swiglu" (DINOv2 ViT-g's SwiGLU FFN), ... (transformer.ACTIVATIONS)
    mlp_dim: int | None = None  # hidden width of the MLP (SwiGLU: of each half); None: mlp_ratio * width
    no_embed_class: bool = False  # timm `no_embed_class` (DeiT-3, UNI2-h): position embeddings for the patches only
    drop_add_residual: bool = False  # DINOv2's drop_add_residual_stochastic_depth for drop path > 0.1 (TransformerBlock)
    sow_cls_logits: bool = False  # every block sows [CLS]'s attention logits ("intermediates"; cls_attention_logits)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token and the registers."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def num_position_prefix(self) -> int:
        """Position embeddings before the patches' (the class token's, unless `no_embed_class`)."""
        return 0 if self.no_embed_class else int(self.class_token)

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: num_heads={self.num_heads} must divide width={self.width}")
        if self.num_register_tokens < 0:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: num_register_tokens={self.num_register_tokens} must be >= 0")
        self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype, self.param_dtype)
        token_init = lambda std: nn.with_logical_partitioning(nn.initializers.normal(std), (None, None, "embed"))  # noqa: E731
        if self.class_token:
            self.cls_token = self.param("cls_token", token_init(0.02), (1, 1, self.width), self.param_dtype)
        if self.num_register_tokens:  # DINOv2 init: normal(1e-6)
            self.register_tokens = self.param("register_tokens", token_init(1e-6),
                                              (1, self.num_register_tokens, self.width), self.param_dtype)
        if self.use_mask_token:
            self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, "embed")), (1, self.width), self.param_dtype)
        if self.pos_embed_init not in ("normal", "sincos"):
            raise ValueError(f"medjax/nn/vit.py ViTEncoder: pos_embed_init={self.pos_embed_init!r}; expected "
                             "'normal' or 'sincos'")
        pos_init = token_init(0.02) if self.pos_embed_init == "normal" else nn.with_logical_partitioning(
            lambda key, shape, dtype: jnp.asarray(sincos_2d(self.width, self.image_size // self.patch_size,
                                                            class_token=bool(self.num_position_prefix))[None], dtype),
            (None, None, "embed"))
        self.pos_embed = self.param("pos_embed", pos_init,
                                    (1, self.num_patches + self.num_position_prefix, self.width), self.param_dtype)
        # Unrolled: blocks_0, blocks_1, ...; scanned: one "blocks" whose params have a leading layer axis.
        self.blocks = layer_stack.block_stack(
            self.depth, self.drop_path_rates(), scan=self.scanned, remat=layer_stack.resolve_remat(self.remat),
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, mlp_dim=self.mlp_dim,
            layerscale_init=self.layerscale_init, activation=self.mlp_activation,
            drop_add_residual=self.drop_add_residual, sow_query_logits=self.sow_cls_logits, dtype=self.dtype,
            param_dtype=self.param_dtype)
        self.norm = layer_norm(self.dtype, self.param_dtype)

    @property
    def scanned(self) -> bool:
        """Whether the blocks run as one nn.scan (`scan`, None: depth >= layer_stack.SCAN_MIN_DEPTH)."""
        return layer_stack.resolve_scan(self.scan, self.depth)

    def drop_path_rates(self) -> list[float]:
        """Block i's stochastic-depth rate: linear 0 .. drop_path (DeiT/MAE), or drop_path everywhere
        (`drop_path_uniform`). A scanned stack takes a non-uniform schedule as a scanned input."""
        if self.drop_path_uniform:
            return [float(self.drop_path)] * self.depth
        return [float(r) for r in np.linspace(0.0, self.drop_path, self.depth)] if self.depth else []

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        p = self.patch_size
        if images.ndim != 4:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.embed: expected images (batch, H, W, channels), "
                             f"got {images.shape}")
        if not self.dynamic_image_size and images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.embed: expected images (batch, {self.image_size}, "
                             f"{self.image_size}, channels), got {images.shape} (set dynamic_image_size=True "
                             f"for other sizes)")
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.embed: image size {images.shape[1:3]} is not a multiple "
                             f"of patch_size={p}")
        return images.shape[1] // p, images.shape[2] // p

    def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
        """(1, [1 +] rows * cols, width): the learned embeddings, the patch part resized to `grid`."""
        pos = self.pos_embed
        prefix, patches = pos[:, :self.num_position_prefix], pos[0, self.num_position_prefix:]
        patches = resize_patch_positions(patches, grid, offset=self.interpolate_offset,
                                         antialias=self.interpolate_antialias)
        return jnp.concatenate([prefix, patches[None]], axis=1)

    def embed(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """Images (batch, H, W, C) -> tokens z^0 (batch, [1 +] [R +] N, width) with position embeddings.

        `masks` (batch, N) bool: those patch embeddings are replaced by the mask token before the
        position embeddings are added (iBOT; DINOv2 `prepare_tokens_with_masks`)."""
        grid = self._grid(images)
        x = self.patch_embed(images.astype(self.dtype))
        if masks is not None:
            if not self.use_mask_token:
                raise ValueError("medjax/nn/vit.py ViTEncoder.embed: masks given but use_mask_token=False")
            if masks.shape != x.shape[:2]:
                raise ValueError(f"medjax/nn/vit.py ViTEncoder.embed: masks must be (batch, patches) = "
                                 f"{x.shape[:2]}, got {masks.shape}")
            x = jnp.where(masks[..., None], self.mask_token.astype(x.dtype)[None], x)
        if self.no_embed_class:  # timm: patches + positions, then [cls, registers] in front (no positions)
            x = x + self.position_embedding(grid).astype(x.dtype)
        if self.class_token:
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        if not self.no_embed_class:
            x = x + self.position_embedding(grid).astype(x.dtype)
        if self.num_register_tokens:
            registers = jnp.broadcast_to(self.register_tokens.astype(x.dtype),
                                         (x.shape[0], self.num_register_tokens, self.width))
            c = int(self.class_token)
            x = jnp.concatenate([x[:, :c], registers, x[:, c:]], axis=1)
        return nn.with_logical_constraint(x, TOKENS)

    def encode(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """The Transformer blocks and the final LayerNorm on already-embedded tokens."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.width:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.encode: expected tokens (batch, tokens, {self.width}), "
                             f"got {tokens.shape}")
        tokens, _ = layer_stack.run_stack(self.blocks, tokens, self.drop_path_rates(), train=train)
        return self.norm(tokens)

    def encode_relation_masked(self, tokens: jax.Array, ratio: float, layers, *, train: bool = False) -> jax.Array:
        """`encode` with MRM's relation masking (ratio `ratio`) in the attention of the blocks `layers` (0-based),
        with the same params as the plain pass (MRM's `mask_layers` placement; unrolled blocks only)."""
        layers = sorted(set(int(i) for i in layers))
        if layers and not 0 <= layers[0] <= layers[-1] < self.depth:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.encode_relation_masked: layers {layers} outside "
                             f"0..{self.depth - 1}")
        if self.scanned:
            raise ValueError("medjax/nn/vit.py ViTEncoder.encode_relation_masked: relation masking in chosen layers "
                             "needs unrolled blocks (set model.scan=false)")
        ratios = [float(ratio) if i in layers else 0.0 for i in range(self.depth)]
        tokens, _ = layer_stack.run_stack(self.blocks, tokens, self.drop_path_rates(), train=train,
                                          relation_mask_ratios=ratios)
        return self.norm(tokens)

    def hidden_states(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Every block's output on embedded tokens, stacked (depth, batch, tokens, width), before the final
        norm (the scan's per-layer outputs when scanned; nothing falls back to the unrolled path)."""
        _, outputs = layer_stack.run_stack(self.blocks, tokens, self.drop_path_rates(), train=train, collect=True)
        return outputs

    def intermediate_layers(self, images: jax.Array, n: int = 1, *, norm: bool = True) -> list[jax.Array]:
        """DINOv2 `get_intermediate_layers(x, n)`: the outputs of the last `n` blocks (all tokens), each
        through the final norm when `norm`."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"medjax/nn/vit.py ViTEncoder.intermediate_layers: n={n} must be in [1, {self.depth}]")
        outputs = self.hidden_states(self.embed(images))
        return [self.norm(y) if norm else y for y in outputs[self.depth - n:]]

    def features(self, images: jax.Array, masks: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """DINOv2 `forward_features` after the final norm: {"cls_token": (batch, width) (with a class
        token), "register_tokens": (batch, R, width), "patch_tokens": (batch, N, width)}."""
        tokens = self.encode(self.embed(images, masks), train=train)
        c = int(self.class_token)
        out = {"register_tokens": tokens[:, c:self.num_prefix_tokens],
               "patch_tokens": tokens[:, self.num_prefix_tokens:]}
        if self.class_token:
            out["cls_token"] = tokens[:, 0]
        return out

    def __call__(self, images: jax.Array, masks: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        return self.encode(self.embed(images, masks), train=train)
