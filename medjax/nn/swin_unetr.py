"""Swin UNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors
in MRI Images", BrainLes 2021, Fig. 1) as MONAI builds it (`SwinUNETR(spatial_dims=3, use_v2=False,
normalize=True)`), channels-last: x (batch, X, Y, Z, C) is MONAI's (batch, C, X, Y, Z) transposed.

    hidden = swinViT(x)                         # medjax.nn.swin.SwinViT: F @ 1/2, 2F @ 1/4, ..., 16F @ 1/32
    enc0 = encoder1(x); enc1 = encoder2(hidden[0]); enc2 = encoder3(hidden[1]); enc3 = encoder4(hidden[2])
    dec4 = encoder10(hidden[4])                 # the bottleneck feature, 16F @ 1/32
    dec3 = decoder5(dec4, hidden[3]); dec2 = decoder4(dec3, enc3); dec1 = decoder3(dec2, enc2)
    dec0 = decoder2(dec1, enc1); out = decoder1(dec0, enc0)            # F @ full resolution
    logits = out_conv(out)                      # SwinUNETR only; the backbone returns (dec4, out)

The CLIP-Driven Universal Model (Liu et al., ICCV 2023) uses `SwinUNETRBackbone` (feature 48: dec4 768 ch
at 1/32, out 48 ch at full resolution, the original's `model/SwinUNETR.py` forward) with MONAI 0.9's
PatchMerging order (`legacy_merging=True`). Encoder / decoder blocks are nnU-Net residual blocks (MONAI
`UnetResBlock`): conv3 (no bias) -> InstanceNorm (no affine, eps 1e-5) -> LeakyReLU 0.01 -> conv3 -> IN,
a 1x1x1 conv + IN shortcut when the channels change, a final LeakyReLU. The up block is a ConvTranspose
k 2 s 2 (no bias), concatenation [up, skip], then a residual block. Inputs: any multiple of 32 per
spatial dimension (patch 2 then four 2x merges).
Param names follow MONAI's state-dict keys (`swinViT/layers1/blocks_0/attn/qkv`, `encoder1/layer/conv1`,
`decoder5/transp_conv`, `decoder5/conv_block/conv3`, ...); `medjax.convert.universal` maps them.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.swin import SwinViT
from medjax.nn.volume_conv import volume_conv_general_dilated

Dtype = Any
_WHERE = "medjax/nn/swin_unetr.py"
VOLUME = ("batch", None, None, None, None)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm3d without affine (biased variance over the spatial axes per sample and channel),
    statistics in float32."""
    y = x.astype(jnp.float32)
    mean = y.mean(axis=(1, 2, 3), keepdims=True)
    var = jnp.square(y - mean).mean(axis=(1, 2, 3), keepdims=True)
    return ((y - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def conv3d(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = False) -> nn.Conv:
    """A stride-1 Conv3d with 'same' zero padding (kernel // 2), kernel (k, k, k, in, out); on CPU, 3x3x3 ones of
    large volumes run as Winograd F(4, 3) along X over 2D plane convolutions (`medjax.nn.volume_conv`)."""
    return nn.Conv(features, (kernel,) * 3, padding=[(kernel // 2, kernel // 2)] * 3, use_bias=use_bias,
                   dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=volume_conv_general_dilated,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(),
                                                            (None, None, None, "channels", None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))


class ConvTranspose2x(nn.Module):
    """ConvTranspose3d(kernel 2, stride 2): out[2i + a, 2j + b, 2k + c] = x[i, j, k] @ kernel[a, b, c].

    kernel (2, 2, 2, in, out) is PyTorch's weight (in, out, 2, 2, 2) transposed (2, 3, 4, 0, 1)."""

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, d, h, w, c = x.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.he_normal(in_axis=-2, out_axis=-1), (None, None, None, "channels", None)),
            (2, 2, 2, c, self.features), self.param_dtype)
        y = jnp.einsum("bxyzc,pqrco->bxpyqzro", x.astype(self.dtype), kernel.astype(self.dtype))
        y = y.reshape(b, 2 * d, 2 * h, 2 * w, self.features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class UnetResBlock(nn.Module):
    """MONAI UnetResBlock (kernel 3, stride 1, instance norm, LeakyReLU 0.01); conv1 / conv2 / conv3."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda k, name: conv3d(self.features, k, self.dtype, self.param_dtype, name)  # noqa: E731
        y = nn.leaky_relu(instance_norm(conv(3, "conv1")(x)), 0.01)
        y = instance_norm(conv(3, "conv2")(y))
        residual = x if x.shape[-1] == self.features else instance_norm(conv(1, "conv3")(x))
        return nn.leaky_relu(y + residual, 0.01)


class UnetrBasicBlock(nn.Module):
    """MONAI UnetrBasicBlock(res_block=True): one UnetResBlock ("layer")."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return UnetResBlock(self.features, self.dtype, self.param_dtype, name="layer")(x)


class UnetrUpBlock(nn.Module):
    """MONAI UnetrUpBlock(res_block=True): transp_conv (k 2, s 2, no bias) -> concat [up, skip] -> conv_block."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        up = ConvTranspose2x(self.features, False, self.dtype, self.param_dtype, name="transp_conv")(x)
        y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
        return UnetResBlock(self.features, self.dtype, self.param_dtype, name="conv_block")(y)


def check_volume(x: jax.Array, multiple: int, where: str) -> None:
    """A clear error unless x is (batch, X, Y, Z, C) with X, Y, Z multiples of `multiple`."""
    if x.ndim != 5:
        raise ValueError(f"{where}: expected x (batch, X, Y, Z, channels), got shape {x.shape}")
    if any(s % multiple or s == 0 for s in x.shape[1:4]):
        raise ValueError(f"{where}: spatial size {tuple(x.shape[1:4])} must be a positive multiple of {multiple} "
                         f"along every axis (pad or crop the volume, e.g. sliding windows of 96^3)")


REMAT_POLICIES = {
    "none": "keep every activation (False)",
    "swin": "recompute each Swin block in the backward pass (True)",
    "all": "recompute each Swin block and each encoder / decoder residual block (their inputs are kept)",
}


def remat_policy(remat: bool | str, where: str) -> str:
    """`remat` as a REMAT_POLICIES name (False -> "none", True -> "swin"); a clear error for other values."""
    policy = {False: "none", True: "swin"}.get(remat, remat) if isinstance(remat, bool) else str(remat)
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{where}: remat={remat!r}; choose one of {sorted(REMAT_POLICIES)} (or False / True)")
    return policy


class SwinUNETRBackbone(nn.Module):
    """Swin UNETR without the final 1x1x1 conv: x (batch, X, Y, Z, C) -> (dec4, out) with dec4 (batch, X/32,
    Y/32, Z/32, 16F) and out (batch, X, Y, Z, F), F = feature_size (module docstring)."""

    feature_size: int = 48
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    legacy_merging: bool = True  # MONAI 0.9 PatchMerging order (the released Universal Model weights)
    mlp_ratio: float = 4.0
    remat: bool | str = False  # REMAT_POLICIES: what the backward pass recomputes instead of keeping
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        del train  # no dropout / stochastic depth (module docstring of medjax.nn.swin)
        where = f"{_WHERE} SwinUNETRBackbone"
        check_volume(x, 32, where)
        policy = remat_policy(self.remat, where)
        basic, up = (nn.remat(UnetrBasicBlock), nn.remat(UnetrUpBlock)) if policy == "all" else (
            UnetrBasicBlock, UnetrUpBlock)
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"{where}: Swin UNETR has 4 stages; got depths={tuple(self.depths)}, "
                             f"num_heads={tuple(self.num_heads)}")
        f, kinds = self.feature_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x.astype(self.dtype), VOLUME)
        hidden = SwinViT(f, tuple(self.depths), tuple(self.num_heads), (self.window_size,) * 3, 2, self.legacy_merging,
                         self.mlp_ratio, policy != "none", name="swinViT", **kinds)(x)
        enc0 = basic(f, name="encoder1", **kinds)(x)
        enc1 = basic(f, name="encoder2", **kinds)(hidden[0])
        enc2 = basic(2 * f, name="encoder3", **kinds)(hidden[1])
        enc3 = basic(4 * f, name="encoder4", **kinds)(hidden[2])
        dec4 = basic(16 * f, name="encoder10", **kinds)(hidden[4])
        dec3 = up(8 * f, name="decoder5", **kinds)(dec4, hidden[3])
        dec2 = up(4 * f, name="decoder4", **kinds)(dec3, enc3)
        dec1 = up(2 * f, name="decoder3", **kinds)(dec2, enc2)
        dec0 = up(f, name="decoder2", **kinds)(dec1, enc1)
        out = up(f, name="decoder1", **kinds)(dec0, enc0)
        return nn.with_logical_constraint(dec4, VOLUME), nn.with_logical_constraint(out, VOLUME)


class SwinUNETR(nn.Module):
    """The whole MONAI SwinUNETR: `SwinUNETRBackbone` ("backbone") then the 1x1x1 conv with bias ("out",
    MONAI `UnetOutBlock`) to `out_channels` logits (batch, X, Y, Z, out_channels)."""

    out_channels: int
    feature_size: int = 48
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    legacy_merging: bool = False  # plain MONAI >= 1.5 models use the fixed order
    remat: bool | str = False  # REMAT_POLICIES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _, out = SwinUNETRBackbone(self.feature_size, tuple(self.depths), tuple(self.num_heads), self.window_size,
                                   self.legacy_merging, remat=self.remat, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="backbone")(x, train=train)
        return conv3d(self.out_channels, 1, self.dtype, self.param_dtype, "out", use_bias=True)(out)
