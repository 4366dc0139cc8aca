"""The 3D Swin Transformer encoder of Swin UNETR (Liu et al., "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows", ICCV 2021; Hatamizadeh et al., "Swin UNETR", BrainLes 2021), as MONAI
implements it (`monai.networks.nets.swin_unetr`, spatial_dims=3, use_v2=False), channels-last.

Axis convention: a MONAI input (B, C, X, Y, Z) transposed to (B, X, Y, Z, C) gives the same numbers here
(MONAI's "d, h, w" are X, Y, Z). Everything is reproduced, including the quirks that change outputs:
- windows: `effective_window` shrinks a window to the feature size along any axis where the size is at
  most the window, and sets that axis' shift to 0 (MONAI `get_window_size`); features are zero-padded
  (after norm1) up to a multiple of the window, and padded tokens take part in the attention unmasked;
- the relative position bias (Swin Eq. 4, Attention = SoftMax(QK^T / sqrt(d) + B) V) gathers
  `relative_position_index(window_size)[:n, :n]` of the *configured* window even when the effective
  window is smaller (n = tokens in the effective window), as MONAI does;
- shifted windows (Swin Sec. 3.2) roll by -window // 2 and mask token pairs from different regions with
  -100 (`shift_attention_mask`, MONAI `compute_mask` on the padded size);
- PatchMerging concatenates 8 strided sub-grids in MONAI's order; `legacy_merging=True` is MONAI 0.9's
  order, which takes two sub-grids twice and one never (the CLIP-Driven Universal Model's released weights
  were trained with it), False the fixed order of current MONAI's `PatchMerging`;
- each stage output is layer-normed over channels without affine (eps 1e-5; SwinUNETR normalize=True).
Dropout, attention dropout and stochastic depth are 0 (the Universal Model trains without them) and absent.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.attention import HeadsDense

Dtype = Any
Triple = tuple[int, int, int]
_WHERE = "medjax/nn/swin.py"

# PatchMerging sub-grid offsets (d, h, w) in concatenation order.
LEGACY_MERGING_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
MERGING_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
_TRUNC_NORMAL = nn.initializers.truncated_normal(0.02)  # MONAI trunc_normal_(std=0.02) for tables / Linear


def effective_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Triple, Triple]:
    """(window, shift) actually used on a feature of spatial `size` (MONAI `get_window_size`)."""
    used_window, used_shift = list(window), list(shift)
    for i, s in enumerate(size):
        if s <= window[i]:
            used_window[i], used_shift[i] = s, 0
    return tuple(used_window), tuple(used_shift)


def window_partition(x, window: Sequence[int]):
    """(b, D, H, W, c) -> (b * windows, wd * wh * ww, c), windows in (d, h, w) row-major order per sample and
    tokens row-major in each window (MONAI `window_partition`). Works on jax and numpy arrays."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def window_reverse(windows, window: Sequence[int], dims: Sequence[int]):
    """Inverse of `window_partition`: (b * windows, n, c) -> (b, D, H, W, c) with dims = (b, D, H, W)."""
    b, d, h, w = dims
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, -1)


def shift_region_labels(dims: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """(windows, n) int32 region label of every token of every window, for shifted-window attention on a
    (padded) feature of spatial `dims` (MONAI `compute_mask`'s `img_mask`: region slices [:-w], [-w:-s],
    [-s:] per axis, with Python slice semantics, so an axis with shift 0 is one region), partitioned."""
    labels = np.zeros((1, *dims, 1), np.int32)
    count = 0
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for sd in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                labels[:, sd, sh, sw, :] = count
                count += 1
    return window_partition(labels, window)[..., 0]


def shift_attention_mask(dims: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """(windows, n, n) float32 additive mask: 0 where query i and key j of a window come from the same region
    of the rolled feature, -100 otherwise (MONAI `compute_mask`)."""
    regions = shift_region_labels(dims, window, shift)
    return region_mask(regions)


def region_mask(regions):
    """(windows, n) region labels -> (windows, n, n) mask, -100 across regions (numpy or jax)."""
    xp = jnp if isinstance(regions, jax.Array) else np
    return xp.where(regions[:, None, :] != regions[:, :, None], -100.0, 0.0).astype(xp.float32)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
    """(n, n) index into the ((2wd-1)(2wh-1)(2ww-1), heads) bias table for token pairs (i, j) of a window:
    the offset coords_i - coords_j shifted to >= 0 and flattened row-major (Swin Sec. 3.2, "Relative
    position bias"; MONAI's `relative_position_index` buffer)."""
    wd, wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wd), np.arange(wh), np.arange(ww), indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # (n, n, 3)
    rel = rel + np.array([wd - 1, wh - 1, ww - 1])
    rel = rel * np.array([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1])
    return rel.sum(-1)


def _dense(features, axes, dtype, param_dtype, name, use_bias=True, axis=-1):
    """torch.nn.Linear over the last 1 or 2 axes into `features` (an int or a tuple), truncated-normal init;
    `HeadsDense` rather than nn.DenseGeneral, whose shape check re-runs a boxed init on the flattened
    kernel and breaks under logical partitioning rules."""
    features = tuple(features) if isinstance(features, tuple) else (features,)
    in_dims = len(axis) if isinstance(axis, tuple) else 1
    return HeadsDense(features, kernel_axes=tuple(axes), in_dims=in_dims, use_bias=use_bias, kernel_init=_TRUNC_NORMAL,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(dtype, param_dtype, name):
    """torch.nn.LayerNorm (eps 1e-5, affine)."""
    return nn.LayerNorm(1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def normalize_channels(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over channels without affine (MONAI `proj_out(normalize=True)`: F.layer_norm(x, [C])),
    statistics in float32."""
    y = x.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    return ((y - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a relative position bias (Swin Eq. 4).

    Params (names of MONAI's `WindowAttention`): relative_position_bias_table (table, heads); qkv kernel
    (dim, 3, heads, head_dim) (torch qkv.weight (3*dim, dim), rows q|k|v each heads-major); proj kernel
    (heads, head_dim, dim).
    """

    num_heads: int
    window_size: Triple  # the configured window: sizes the bias table and its index
    loop_windows: bool | None = None  # attend one window at a time (lax.map); None: on CPU only
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, windows: jax.Array, regions: jax.Array | None) -> jax.Array:
        """windows (b, windows, n, dim); regions (windows, n) shifted-window region labels (`shift_region_labels`)
        or None (no shift) -> (b, windows, n, dim). The -100 mask is built in the graph from the labels (a
        constant mask would be windows * n * n floats: 160 MB at 96^3).

        On CPU the attention runs window by window (`lax.map`): all windows at once materialise
        (b, windows, heads, n, n) logits (485 MB per block at the first stage of a 96^3 input), which
        XLA:CPU writes and re-reads several times; one window's fit in cache (first-stage block on a
        2-core host: 1.29 s all at once, 0.32 s window by window, same numbers). GPU/TPU batch them."""
        b, nw, n, dim = windows.shape
        heads = self.num_heads
        if dim % heads:
            raise ValueError(f"{_WHERE} WindowAttention: num_heads={heads} must divide the width {dim}")
        head_dim = dim // heads
        wd, wh, ww = self.window_size
        table = self.param("relative_position_bias_table", nn.with_logical_partitioning(_TRUNC_NORMAL, (None, "heads")),
                           ((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), heads), self.param_dtype)
        qkv = _dense((3, heads, head_dim), ("embed", None, "heads", "kv"), self.dtype, self.param_dtype, "qkv")(windows)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (b, windows, n, heads, head_dim)
        q = q * head_dim ** -0.5
        index = relative_position_index(self.window_size)[:n, :n].reshape(-1)  # MONAI's [:n, :n] (module doc)
        bias = jnp.asarray(table, jnp.float32)[index].reshape(n, n, heads).transpose(2, 0, 1)

        def attend(q, k, v, regions):  # (b, w, n, heads, head_dim) x3, (w, n) or None
            logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32) + bias[None, None]
            if regions is not None:
                logits = logits + region_mask(regions)[None, :, None]
            attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            return jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v)

        # Differentiated, only q, k, v are kept: the backward recomputes the (heads, n, n) logits and softmax
        # per window (saving them cost 4 x 462 MiB per first-stage block of a 96^3 crop on CPU).
        attend = jax.checkpoint(attend)
        loop = jax.default_backend() == "cpu" if self.loop_windows is None else self.loop_windows
        if loop and nw > 1:
            per_window = lambda a: jnp.moveaxis(a, 1, 0)[:, :, None]  # noqa: E731  (w, b, 1, ...)
            masks = None if regions is None else regions[:, None]
            out = jax.lax.map(lambda t: attend(*t[:3], t[3])[:, 0],
                              (per_window(q), per_window(k), per_window(v), masks))
            out = jnp.moveaxis(out, 0, 1)
        else:
            out = attend(q, k, v, regions)
        return _dense(dim, ("heads", "kv", "embed"), self.dtype, self.param_dtype, "proj", axis=(-2, -1))(out)


class SwinMlp(nn.Module):
    """MONAI MLPBlock (dropout_mode "swin"): linear1 -> exact GELU -> linear2."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, "linear1")(x)
        y = nn.gelu(y, approximate=False)
        return _dense(x.shape[-1], ("mlp", "embed"), self.dtype, self.param_dtype, "linear2")(y)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window block (Swin Eq. 3): x + W-MSA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    window_size: Triple
    shift_size: Triple
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, d, h, w, c = x.shape
        window, shift = effective_window((d, h, w), self.window_size, self.shift_size)
        y = _layer_norm(self.dtype, self.param_dtype, "norm1")(x)
        pads = [(-size) % win for size, win in zip((d, h, w), window)]
        y = jnp.pad(y, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
        padded = (d + pads[0], h + pads[1], w + pads[2])
        shifted = any(s > 0 for s in shift)
        regions = None
        if shifted:
            y = jnp.roll(y, tuple(-s for s in shift), axis=(1, 2, 3))
            regions = jnp.asarray(shift_region_labels(padded, window, shift))
        windows = window_partition(y, window)
        windows = windows.reshape(b, -1, *windows.shape[1:])
        attention = WindowAttention(self.num_heads, self.window_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")
        y = attention(windows, regions)
        y = window_reverse(y.reshape(-1, *y.shape[2:]), window, (b, *padded))
        if shifted:
            y = jnp.roll(y, shift, axis=(1, 2, 3))
        x = x + y[:, :d, :h, :w]
        y = _layer_norm(self.dtype, self.param_dtype, "norm2")(x)
        return x + SwinMlp(int(c * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(y)


def merge_subgrids(x: jax.Array, legacy: bool) -> jax.Array:
    """(b, D, H, W, c) -> (b, D/2, H/2, W/2, 8c): the 8 strided sub-grids x[:, i::2, j::2, k::2] concatenated
    over channels in MONAI 0.9's order (`legacy`) or current MONAI's."""
    b, d, h, w, c = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"{_WHERE} PatchMerging: spatial size {(d, h, w)} must be even")
    offsets = LEGACY_MERGING_OFFSETS if legacy else MERGING_OFFSETS
    return jnp.concatenate([x[:, i::2, j::2, k::2] for i, j, k in offsets], axis=-1)


class PatchMerging(nn.Module):
    """2x downsampling (Swin Sec. 3.1): concat of the 8 strided sub-grids -> LayerNorm(8c) -> Linear 8c -> 2c
    (no bias). `legacy` picks MONAI 0.9's sub-grid order (module doc)."""

    legacy: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = merge_subgrids(x, self.legacy)
        x = _layer_norm(self.dtype, self.param_dtype, "norm")(x)
        return _dense(2 * c, ("embed", None), self.dtype, self.param_dtype, "reduction", use_bias=False)(x)


class SwinStage(nn.Module):
    """MONAI BasicLayer: `depth` blocks, shift window // 2 in odd blocks, then PatchMerging ("downsample")."""

    depth: int
    num_heads: int
    window_size: Triple
    legacy_merging: bool = True
    mlp_ratio: float = 4.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = nn.remat(SwinBlock) if self.remat else SwinBlock
        half = tuple(w // 2 for w in self.window_size)
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.window_size, (0, 0, 0) if i % 2 == 0 else half, self.mlp_ratio,
                          self.dtype, self.param_dtype, name=f"blocks_{i}")(x)
            x = nn.with_logical_constraint(x, ("batch", None, None, None, "embed"))
        return PatchMerging(self.legacy_merging, self.dtype, self.param_dtype, name="downsample")(x)


class SwinViT(nn.Module):
    """Patch embedding (conv k = stride = patch) and len(depths) stages; returns the len(depths) + 1
    channel-normalised features [embed @ 1/2, stage 1 @ 1/4, ..., stage 4 @ 1/32] (for feature 48:
    48, 96, 192, 384, 768 channels), MONAI `SwinTransformer.forward(x, normalize=True)`."""

    embed_dim: int = 48
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Triple = (7, 7, 7)
    patch_size: int = 2
    legacy_merging: bool = True
    mlp_ratio: float = 4.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"{_WHERE} SwinViT: depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                             "must have the same length")
        p = self.patch_size
        x = PatchEmbed(self.embed_dim, p, self.dtype, self.param_dtype, name="patch_embed")(x)
        outs = [normalize_channels(x)]
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            x = SwinStage(depth, heads, tuple(self.window_size), self.legacy_merging, self.mlp_ratio, self.remat,
                          self.dtype, self.param_dtype, name=f"layers{i + 1}")(x)
            outs.append(normalize_channels(x))
        return outs


class PatchEmbed(nn.Module):
    """Non-overlapping 3D patch projection ("proj": Conv3d kernel = stride = patch, with bias)."""

    embed_dim: int
    patch_size: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p, p), strides=(p, p, p), padding="VALID", dtype=self.dtype,
                       param_dtype=self.param_dtype, name="proj",
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                (None, None, None, "channels", "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)
