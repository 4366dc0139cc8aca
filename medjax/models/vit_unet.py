"""A ResNet-50 U-Net head on a pre-trained ViT encoder, for MRM's PALM segmentation transfer (Yang et al.,
ICCV 2023, Tab. 1; the protocol of ContIG, Taleb et al., CVPR 2022, `palm_myopia_segmentation.py` with
`models/resnet_unet.py`'s `UNetWithResnet50Encoder`).

ContIG's U-Net decoder of ResNet-50, channels-last, widths as ResNet-50's (`widths` = stem, layer1..layer4):

    bridge:  ConvBlock(2048) x 2 on the stride-32 features (2048)
    up 1..3: ConvT 2x2/2 -> 1024 ++ skip s16 (1024) -> ConvBlock 1024 x 2; -> 512 ++ s8 (512); -> 256 ++ s4 (256)
    up 4:    ConvT 256 -> 128 ++ the stem's stride-2 features (64) -> ConvBlock 128 x 2
    up 5:    ConvT 128 -> 64 ++ the input image (3) -> ConvBlock 64 x 2
    out:     Conv 1x1 -> num_classes logits (disc, atrophy), full resolution

ConvBlock = Conv 3x3 pad 1 (with bias) -> BatchNorm -> ReLU (PyTorch momentum 0.1, eps 1e-5: running averages
in the `batch_stats` collection, batch statistics when `train`).

The encoder is the MRM-pretrained ViT (submodule `encoder`, the fields of `MRM.image_encoder`, so the pretrained
`params["image_encoder"]` load unchanged). A ViT has one stride (its patch size), so ResNet-50's four stage
outputs are made from the blocks at depths d/4, d/2, 3d/4 and d (UNETR's z3, z6, z9, z12 for ViT-B, Hatamizadeh
et al., WACV 2022; the last through the encoder's final norm), each resampled to the stage's stride and width as
ViTDet's simple feature pyramid does (Li et al., ECCV 2022: 2x2/2 transposed convs up, a strided conv down, a 1x1
conv at the same stride), and ResNet-50's input block (Conv 7x7/2, BatchNorm, ReLU; 64 channels, trained from
scratch) gives the stride-2 skip the ViT does not have. OUR design where a ResNet-50 encoder has no ViT analogue.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.vit import ViTEncoder

Dtype = Any
_WHERE = "medjax/models/vit_unet.py"
RESNET50_WIDTHS = (64, 256, 512, 1024, 2048)  # the input block, layer1..layer4 output channels
STAGE_STRIDES = (4, 8, 16, 32)  # layer1..layer4 strides


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, param_dtype: Dtype, name: str,
          use_bias: bool = True, padding: int | None = None) -> nn.Conv:
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=[(pad, pad)] * 2, use_bias=use_bias,
                   dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), (None, None, "channels", None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))


def _batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.BatchNorm:
    """PyTorch BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)))


class ConvTranspose2x(nn.Module):
    """ConvTranspose2d(kernel 2, stride 2, bias): out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.he_normal(in_axis=-2, out_axis=-1), (None, None, "channels", None)),
            (2, 2, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                          (self.features,), self.param_dtype)
        y = jnp.einsum("bhwc,pqco->bhpwqo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class ConvBlock(nn.Module):
    """ContIG's ConvBlock: Conv 3x3 pad 1 -> BatchNorm -> ReLU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, 3, 1, self.dtype, self.param_dtype, "conv")(x)
        return nn.relu(_batch_norm(train, self.dtype, self.param_dtype, "bn")(x))


class UpBlock(nn.Module):
    """ContIG's UpBlockForUNetWithResNet50: ConvT 2x2/2 -> `features`, concat the skip, ConvBlock x 2."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, up: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvTranspose2x(self.features, **kinds, name="upsample")(up)
        if x.shape[1:3] != skip.shape[1:3]:
            raise ValueError(f"{_WHERE} UpBlock: upsampled {x.shape[1:3]} vs skip {skip.shape[1:3]}: the image size "
                             "must be a multiple of 32")
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = ConvBlock(self.features, **kinds, name="conv_block_1")(x, train)
        return ConvBlock(self.features, **kinds, name="conv_block_2")(x, train)


class ResampleToStride(nn.Module):
    """ViT features at stride `source` -> `features` channels at stride `target` (ViTDet's simple pyramid):
    2x2/2 transposed convs up (BatchNorm + ReLU between two), a conv of kernel = stride = source/target down,
    a 1x1 conv at the same stride."""

    features: int
    source: int
    target: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.source > self.target:
            steps = int(round(math.log2(self.source // self.target)))
            for i in range(steps):
                if i:
                    x = nn.relu(_batch_norm(train, self.dtype, self.param_dtype, f"bn_{i}")(x))
                x = ConvTranspose2x(self.features, **kinds, name=f"up_{i}")(x)
            return x
        factor = self.target // self.source
        return _conv(self.features, factor, factor, self.dtype, self.param_dtype, "proj", padding=0)(x)


class ViTUNet(nn.Module):
    """Pretrained ViT encoder + ContIG's ResNet-50 U-Net decoder: images (B, H, W, 3) -> logits (B, H, W, classes)."""

    num_classes: int = 2
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    widths: Sequence[int] = RESNET50_WIDTHS
    remat: bool | str = "none"
    scan: bool | str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stage_blocks(self) -> list[int]:
        """The (1-based) encoder blocks whose outputs feed ResNet-50's four stages: d/4, d/2, 3d/4, d."""
        return [max(1, round(self.depth * k / 4)) for k in range(1, 5)]

    def _check(self) -> None:
        if len(self.widths) != 5:
            raise ValueError(f"{_WHERE} ViTUNet.widths: expected 5 widths (stem, layer1..layer4), got {self.widths}")
        p = self.patch_size
        if p & (p - 1) or p < 2:
            raise ValueError(f"{_WHERE} ViTUNet.patch_size={p}: expected a power of 2 (the pyramid resamples by 2x)")
        if self.image_size % 32:
            raise ValueError(f"{_WHERE} ViTUNet.image_size={self.image_size}: expected a multiple of 32 (ResNet-50's "
                             "deepest stride)")

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        self._check()
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        encoder = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
                             class_token=True, drop_path=self.drop_path, remat=self.remat, scan=self.scan, **kinds,
                             name="encoder")
        hidden = encoder.hidden_states(encoder.embed(images), train=train)  # (depth, B, 1 + N, width)
        grid = self.image_size // self.patch_size
        blocks = self.stage_blocks()
        stages = []
        for k, (block, stride, features) in enumerate(zip(blocks, STAGE_STRIDES, self.widths[1:])):
            tokens = encoder.norm(hidden[block - 1]) if k == 3 else hidden[block - 1]
            fmap = tokens[:, 1:].reshape(images.shape[0], grid, grid, self.width)
            stages.append(ResampleToStride(features, self.patch_size, stride, **kinds, name=f"pyramid_{k}")(
                fmap, train))
        x = images.astype(self.dtype)
        stem = _conv(self.widths[0], 7, 2, self.dtype, self.param_dtype, "stem_conv", use_bias=False)(x)  # ResNet conv1
        stem = nn.relu(_batch_norm(train, self.dtype, self.param_dtype, "stem_bn")(stem))
        y = ConvBlock(self.widths[4], **kinds, name="bridge_0")(stages[3], train)
        y = ConvBlock(self.widths[4], **kinds, name="bridge_1")(y, train)
        skips = (stages[2], stages[1], stages[0], stem, x)
        outs = (self.widths[3], self.widths[2], self.widths[1], self.widths[1] // 2, self.widths[0])
        for i, (skip, features) in enumerate(zip(skips, outs)):
            y = UpBlock(features, **kinds, name=f"up_{i}")(y, skip, train)
        return _conv(self.num_classes, 1, 1, self.dtype, self.param_dtype, "out")(y).astype(jnp.float32)
