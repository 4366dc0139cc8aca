"""MedicalNet's 3D ResNet (Chen, Ma & Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis", 2019;
Tencent/MedicalNet `models/resnet.py`), as ViSD-Boost uses it (Cao et al., ICCV 2025; alibaba-damo-academy/
ViSD-Boost `lavis/utils/resnet.py`): a backbone returning the four stage feature maps.

    conv1  Conv3d 1 -> 64, kernel 7, stride (1, 2, 2), padding 3, no bias -> BN -> ReLU
    maxpool kernel 3, stride 2, padding 1
    layer1  64 ch, stride 1                 (ResNet-18: 2 BasicBlocks per layer)
    layer2 128 ch, stride 2
    layer3 256 ch, stride 2, dilation 2     (ViSD-Boost's strides; MedicalNet's segmentation nets use 1)
    layer4 512 ch, stride 2, dilation 4
For a 112 x 256 x 352 (D, H, W) crop the stages are 56x64x88, 28x32x44, 14x16x22 and 7x8x11: the stage-s map
is the input divided by (2^s, 2^(s+1), 2^(s+1)).

BasicBlock: conv3x3x3(stride, dilation, padding = dilation) -> BN -> ReLU -> conv3x3x3(dilation) -> BN, plus
the shortcut, -> ReLU. Shortcut type "A" (`downsample_basic_block`): the input subsampled by the stride
(`avg_pool3d(kernel 1, stride)`) with zero channels appended; type "B": Conv 1x1x1 (stride) -> BN. The
original builds type A's output with `Variable(torch.cat([out.data, zeros]))`: `.data` detaches it, so no
gradient flows through the shortcut of the first block of layers 2-4. `detach_shortcut=True` reproduces
that; False (our default) lets the identity gradient through, as a residual connection means to.

BatchNorm (`BatchNorm`): PyTorch's BatchNorm3d, eps 1e-5, momentum 0.1: batch statistics in training (the
running mean/variance in the `batch_stats` collection updated with the unbiased batch variance when that
collection is mutable), the running statistics at evaluation. Under a sharded jit the batch statistics are
those of the global batch (SyncBN). Convolutions: kaiming-normal (fan_out), as the original.

Layout: volumes (batch, D, H, W, channels); param names follow the PyTorch state dict (`conv1`, `bn1`,
`layer1_0/conv1`, `layer2_0/downsample_0` ...).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
_WHERE = "medjax/nn/resnet3d.py"
DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # BasicBlocks per layer (MedicalNet)
STRIDES = (1, 2, 2, 2)
DILATIONS = (1, 1, 2, 4)


def stem_conv_by_planes(x: jax.Array, kernel: jax.Array, stride_hw: Sequence[int], padding: int,
                        precision: Any = None) -> jax.Array:
    """A depth-stride-1 3D convolution of a ONE-channel volume as one 2D convolution over the (H, W) planes:
    the depth axis folded into the batch, the kd depth taps as kd groups of output channels, the shifted groups
    summed (out[d] = sum_i conv2d(x_pad[d + i], W[i])). XLA:CPU's 3D convolution emitter is at its worst with
    one input channel (medjax.nn.volume_conv): for the 7^3 stem this is ~20x faster; the same linear map."""
    b, d, h, w, _ = x.shape
    kd, kh, kw, _, c = kernel.shape
    xp = jnp.pad(x, [(0, 0), (padding, padding), (0, 0), (0, 0), (0, 0)])
    planes_kernel = jnp.transpose(kernel[..., 0, :], (1, 2, 0, 3)).reshape(kh, kw, 1, kd * c)
    y = lax.conv_general_dilated(xp.reshape(b * (d + 2 * padding), h, w, 1), planes_kernel, tuple(stride_hw),
                                 [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=precision)
    y = y.reshape(b, d + 2 * padding, y.shape[1], y.shape[2], kd, c)
    depth_out = d + 2 * padding - kd + 1
    return sum(y[:, i:i + depth_out, :, :, i] for i in range(kd))


def resnet_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                                preferred_element_type=None):
    """`lax.conv_general_dilated`, except on CPU for a one-channel input with depth stride 1, no dilation and
    symmetric padding (the stem): `stem_conv_by_planes`."""
    pads = None if isinstance(padding, str) else {tuple(p) for p in padding}
    if (jax.default_backend() == "cpu" and lhs.ndim == 5 and lhs.shape[-1] == 1 and rhs.shape[3] == 1
            and window_strides[0] == 1 and pads is not None and len(pads) == 1 and feature_group_count == 1
            and batch_group_count == 1 and all(v is None or tuple(v) == (1, 1, 1) for v in (lhs_dilation, rhs_dilation))
            and next(iter(pads))[0] == next(iter(pads))[1]):
        out = stem_conv_by_planes(lhs, rhs, window_strides[1:], next(iter(pads))[0], precision)
        return out.astype(preferred_element_type) if preferred_element_type is not None else out
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)


def conv(features: int, kernel: int, stride: Sequence[int] | int, dilation: int, padding: int, dtype: Dtype,
         param_dtype: Dtype, name: str) -> nn.Conv:
    """Conv3d without bias, kaiming-normal fan_out init (MedicalNet), kernel (k, k, k, in, out)."""
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    return nn.Conv(features, (kernel,) * 3, strides=stride, padding=[(padding, padding)] * 3,
                   kernel_dilation=(dilation,) * 3, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                   conv_general_dilated=resnet_conv_general_dilated,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                                            (None, None, None, "channels", None)))


class BatchNorm(nn.Module):
    """PyTorch BatchNorm3d (module docstring) over the last axis: params "scale", "bias"; batch_stats "mean",
    "var" (running, var unbiased). train=True normalises with the batch's biased statistics."""

    momentum: float = 0.1  # PyTorch convention: running = (1 - m) running + m batch
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)), (c,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)), (c,),
                          self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: nn.Partitioned(jnp.zeros((c,), jnp.float32),
                                                                               ("channels",)))
        ra_var = self.variable("batch_stats", "var", lambda: nn.Partitioned(jnp.ones((c,), jnp.float32), ("channels",)))
        y = x.astype(jnp.float32)
        if train:
            mean = y.mean(axes)
            var = jnp.square(y - mean).mean(axes)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = y.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def shortcut_a(x: jax.Array, features: int, stride: int, detach: bool) -> jax.Array:
    """MedicalNet's type-A shortcut: x[::stride] per spatial axis, zero channels appended up to `features`."""
    out = x[:, ::stride, ::stride, ::stride]
    if detach:
        out = jax.lax.stop_gradient(out)
    pad = features - out.shape[-1]
    return jnp.pad(out, [(0, 0)] * 4 + [(0, pad)]) if pad > 0 else out


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    dilation: int = 1
    shortcut_type: str = "A"
    detach_shortcut: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.dilation
        y = conv(self.features, 3, self.stride, d, d, name="conv1", **kinds)(x)
        y = nn.relu(BatchNorm(name="bn1", **kinds)(y, train))
        y = conv(self.features, 3, 1, d, d, name="conv2", **kinds)(y)
        y = BatchNorm(name="bn2", **kinds)(y, train)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut_type == "A":
                residual = shortcut_a(x, self.features, self.stride, self.detach_shortcut)
            else:
                residual = conv(self.features, 1, self.stride, 1, 0, name="downsample_0", **kinds)(x)
                residual = BatchNorm(name="downsample_1", **kinds)(residual, train)
        return nn.relu(y + residual.astype(y.dtype))


class ResNet3D(nn.Module):
    """(batch, D, H, W, in_channels) -> the four stage maps [(batch, D/2^s, H/2^(s+1), W/2^(s+1), width 2^(s-1))],
    s = 1..4 (module docstring). `width`: layer1's channels (64 in MedicalNet)."""

    depth: int = 18
    width: int = 64
    shortcut_type: str = "A"
    detach_shortcut: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        if self.depth not in DEPTHS:
            raise ValueError(f"{_WHERE} ResNet3D.depth={self.depth}: expected one of {sorted(DEPTHS)} (BasicBlock nets)")
        if self.shortcut_type not in ("A", "B"):
            raise ValueError(f"{_WHERE} ResNet3D.shortcut_type={self.shortcut_type!r}: expected 'A' or 'B'")
        if x.ndim != 5:
            raise ValueError(f"{_WHERE} ResNet3D: volumes (batch, D, H, W, channels) expected, got shape {x.shape}")
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.width, 7, (1, 2, 2), 1, 3, name="conv1", **kinds)(x.astype(self.dtype))
        x = nn.relu(BatchNorm(name="bn1", **kinds)(x, train))
        x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=[(1, 1)] * 3)
        stages = []
        for layer, (blocks, stride, dilation) in enumerate(zip(DEPTHS[self.depth], STRIDES, DILATIONS)):
            features = self.width * 2 ** layer
            for i in range(blocks):
                x = BasicBlock(features, stride if i == 0 else 1, dilation, self.shortcut_type, self.detach_shortcut,
                               name=f"layer{layer + 1}_{i}", **kinds)(x, train)
            stages.append(x)
        return stages
