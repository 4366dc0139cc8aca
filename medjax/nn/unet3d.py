"""The 3D U-Net of Models Genesis (Zhou et al., "Models Genesis: Generic Autodidactic Models for 3D Medical
Image Analysis", MICCAI 2019; MrGiovanni/ModelsGenesis `unet3d.py`) as the CLIP-Driven Universal Model uses it
(Liu et al., ICCV 2023; the original's `model/Unet.py`), channels-last, without the output transition.

    down_tr64:  conv 1->32, conv 32->64          (skip 64 @ 1)    -> maxpool
    down_tr128: conv 64->64, conv 64->128        (skip 128 @ 1/2) -> maxpool
    down_tr256: conv 128->128, conv 128->256     (skip 256 @ 1/4) -> maxpool
    down_tr512: conv 256->256, conv 256->512     = dec4 (512 @ 1/8), no pool
    up_tr256: ConvT 512->512 (k 2, s 2) ++ skip256 -> conv 768->256, conv 256->256
    up_tr128: ConvT 256->256 ++ skip128 -> conv 384->128, conv 128->128
    up_tr64:  ConvT 128->128 ++ skip64  -> conv 192->64, conv 64->64 = out (64 @ 1)

Each conv is LUConv: Conv3d k 3 pad 1 (bias) -> BatchNorm -> ReLU. The original's `ContBatchNorm3d`
always normalises with the batch's statistics, also at evaluation (`F.batch_norm(..., training=True)`);
`batch_stats_always=True` (default, for parity with the released weights) reproduces that with no running
averages at all; False is standard BatchNorm with running averages in the `batch_stats` collection
(momentum 0.1 in PyTorch terms), batch statistics when `train=True`. Under a sharded jit the batch
statistics are those of the global batch (the original, without SyncBN, uses each GPU's). Inputs: any
multiple of 8 per spatial dimension.
Param names follow the PyTorch state dict (`down_tr64/ops_0/conv1`, `bn1`, `up_tr256/up_conv`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.swin_unetr import VOLUME, ConvTranspose2x, check_volume, conv3d

Dtype = Any
_WHERE = "medjax/nn/unet3d.py"


class BatchStatsNorm(nn.Module):
    """BatchNorm that always uses the current batch's statistics (biased variance over batch and space),
    eps 1e-5, affine ("scale", "bias"): the original's ContBatchNorm3d forward."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)), (c,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)), (c,),
                          self.param_dtype)
        y = x.astype(jnp.float32)
        mean = y.mean(axis=(0, 1, 2, 3))
        var = jnp.square(y - mean).mean(axis=(0, 1, 2, 3))
        y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LUConv(nn.Module):
    """Conv3d k 3 pad 1 ("conv1", with bias) -> BatchNorm ("bn1") -> ReLU."""

    features: int
    batch_stats_always: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv3d(self.features, 3, self.dtype, self.param_dtype, "conv1", use_bias=True)(x)
        if self.batch_stats_always:
            y = BatchStatsNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(y)
        else:
            y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="bn1",
                             scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)))(y)
        return nn.relu(y)


class UNet3DBackbone(nn.Module):
    """Models-Genesis UNet3D: x (batch, X, Y, Z, C) -> (dec4 (batch, X/8, Y/8, Z/8, 512), out (batch, X, Y, Z, 64))."""

    batch_stats_always: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        check_volume(x, 8, f"{_WHERE} UNet3DBackbone")
        x = nn.with_logical_constraint(x.astype(self.dtype), VOLUME)
        skips = []
        for depth, name in enumerate(("down_tr64", "down_tr128", "down_tr256", "down_tr512")):
            x, skip = DownTransition(depth, self.batch_stats_always, self.dtype, self.param_dtype, name=name)(x, train)
            skips.append(skip)
        dec4 = x
        for depth, name in zip((2, 1, 0), ("up_tr256", "up_tr128", "up_tr64")):
            x = UpTransition(depth, self.batch_stats_always, self.dtype, self.param_dtype, name=name)(
                x, skips[depth], train)
        return nn.with_logical_constraint(dec4, VOLUME), nn.with_logical_constraint(x, VOLUME)


def _two_convs(x: jax.Array, first: int, second: int, batch_stats_always: bool, dtype: Dtype, param_dtype: Dtype,
               train: bool) -> jax.Array:
    """`_make_nConv`: LUConv "ops_0" then LUConv "ops_1" (PyTorch `ops.0`, `ops.1`), inside the caller."""
    kinds = dict(batch_stats_always=batch_stats_always, dtype=dtype, param_dtype=param_dtype)
    x = LUConv(first, name="ops_0", **kinds)(x, train)
    return LUConv(second, name="ops_1", **kinds)(x, train)


class DownTransition(nn.Module):
    """Two LUConvs to 32 * 2^depth then twice that; (2x max-pooled output, unpooled output) except at
    depth 3, which returns its output unpooled twice."""

    depth: int
    batch_stats_always: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        width = 32 * 2 ** self.depth
        out = _two_convs(x, width, 2 * width, self.batch_stats_always, self.dtype, self.param_dtype, train)
        if self.depth == 3:
            return out, out
        return nn.max_pool(out, (2, 2, 2), strides=(2, 2, 2)), out


class UpTransition(nn.Module):
    """up_conv (ConvTranspose3d k 2 s 2, with bias, channels kept) -> concat [up, skip] -> two LUConvs of
    32 * 2^(depth + 1) channels."""

    depth: int
    batch_stats_always: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
        up = ConvTranspose2x(x.shape[-1], True, self.dtype, self.param_dtype, name="up_conv")(x)
        x = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
        width = 32 * 2 ** (self.depth + 1)
        return _two_convs(x, width, width, self.batch_stats_always, self.dtype, self.param_dtype, train)
