"""UNI's tile encoder (Chen et al., "Towards a general-purpose foundation model for computational pathology",
Nat. Med. 2024; mahmoodlab/UNI): timm's `vit_large_patch16_224` created with `init_values=1e-5`
(LayerScale) and `num_classes=0`.

ViT-L/16 (width 1024, 24 blocks, 16 heads, MLP 4096, GELU, qkv bias), a class token, learned position
embeddings for 14 x 14 + 1 tokens, pre-norm blocks x + ls1 * attn(LN(x)), x + ls2 * mlp(LN(x)), LayerNorm
eps 1e-6; its feature is the class token after the final norm (timm's `forward_features` +
`forward_head(pre_logits)` with global_pool="token"). Built from `medjax.nn.vit.ViTEncoder` (submodule
"encoder"), so the same params also initialise the library's ViT (e.g. for DINOv2 continued pretraining).
`medjax.convert.uni.load` fills it with the released weights.

UNI2-h (mahmoodlab/UNI2-h, 2025) is the same encoder class with `UNI2_H`'s fields: ViT-H/14-like (width 1536,
24 blocks, 24 heads), SwiGLU MLP (SiLU gate), 8 register tokens, no class-token position embedding; feature 1536-d.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.transformer import SCAN_NAME, layer_count
from medjax.nn.vit import ViTEncoder

Dtype = Any

# timm vit_large_patch16_224 as UNI creates it (UNI README: img_size=224, patch_size=16, init_values=1e-5,
# num_classes=0, dynamic_img_size=True).
UNI_VIT_L16 = dict(image_size=224, patch_size=16, width=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                   layerscale_init=1e-5)
# UNI2-h (mahmoodlab/UNI2-h model card): timm vit_giant_patch14_224 with img_size=224, patch_size=14, depth=24,
# num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
# mlp_layer=SwiGLUPacked, act_layer=SiLU, reg_tokens=8, dynamic_img_size=True. SwiGLUPacked's fc1 is
# Linear(1536, int(1536 * 5.33334) = 8192), split in halves: silu(first) * second -> fc2 Linear(4096, 1536).
UNI2_H = dict(image_size=224, patch_size=14, width=1536, depth=24, num_heads=24, mlp_ratio=4096 / 1536, mlp_dim=4096,
              mlp_activation="swiglu", layerscale_init=1e-5, num_register_tokens=8, no_embed_class=True)
# Every architecture field of UNIEncoder (what `uni_model` overrides and `uni_fields_from_params` reads).
ARCH_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "mlp_dim", "mlp_activation",
               "layerscale_init", "num_register_tokens", "no_embed_class", "interpolate_offset",
               "interpolate_antialias")
LAYOUT_FIELDS = ("scan", "remat")  # how the blocks run (nn.scan / nn.remat), not the architecture


class UNIEncoder(nn.Module):
    """Images (batch, H, W, 3), ImageNet-normalised -> the class token after the final LayerNorm
    (batch, width): UNI's tile feature (1024-d for ViT-L/16, 1536-d for UNI2-h).

    Any image whose sides are multiples of the patch is accepted (timm's `dynamic_img_size`): the position
    embeddings are resized as timm's `resample_abs_pos_embed` does (bicubic, antialiased, to the grid size:
    interpolate_offset 0, interpolate_antialias True). Registers (UNI2-h: 8) follow the class token; with
    `no_embed_class` (UNI2-h) only the patches have position embeddings."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None  # None: mlp_ratio * width
    mlp_activation: str = "gelu"  # "swiglu": timm SwiGLUPacked (UNI2-h)
    layerscale_init: float | None = 1e-5
    num_register_tokens: int = 0
    no_embed_class: bool = False
    interpolate_offset: float = 0.0  # timm resamples to the grid size (DINOv2's kludge is 0.1)
    interpolate_antialias: bool = True  # timm's resample_abs_pos_embed default
    scan: bool | str | None = None  # ViTEncoder.scan: None scans 24 blocks (params under encoder/blocks)
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        tokens = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads,
                            self.mlp_ratio, class_token=True, layerscale_init=self.layerscale_init,
                            remat=self.remat, scan=self.scan, num_register_tokens=self.num_register_tokens,
                            dynamic_image_size=True, interpolate_offset=self.interpolate_offset,
                            interpolate_antialias=self.interpolate_antialias, mlp_activation=self.mlp_activation,
                            mlp_dim=self.mlp_dim, no_embed_class=self.no_embed_class, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="encoder")(images, train=train)
        return tokens[:, 0]


def uni_model(*, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, **overrides) -> UNIEncoder:
    """UNIEncoder with UNI_VIT_L16's fields, `overrides` replacing some (unknown names are an error: the
    ARCH_FIELDS and the layout fields `scan` and `remat`); `uni_model(**UNI2_H)` is UNI2-h."""
    unknown = sorted(set(overrides) - set(ARCH_FIELDS) - set(LAYOUT_FIELDS))
    if unknown:
        raise ValueError(f"medjax/models/uni.py: unknown model field(s) {unknown}; fields: "
                         f"{list(ARCH_FIELDS) + list(LAYOUT_FIELDS)}")
    return UNIEncoder(**{**UNI_VIT_L16, **overrides}, dtype=dtype, param_dtype=param_dtype)


def uni_fields_from_params(params: Any) -> dict:
    """UNIEncoder fields read off a converted params tree {"encoder": ...}: ViT shapes, registers, whether the
    class token has a position embedding, SwiGLU (a `w12` projection), LayerScale if present; the layout."""
    enc = params["encoder"]
    width = enc["pos_embed"].shape[-1]
    patch = enc["patch_embed"]["proj"]["kernel"].shape[0]
    positions = enc["pos_embed"].shape[1]
    no_embed_class = int(round(positions ** 0.5)) ** 2 == positions  # a square: no class-token position
    grid = int(round((positions - (0 if no_embed_class else 1)) ** 0.5))
    scanned = SCAN_NAME in enc  # one nn.scan'd "blocks" (leading layer axis) or blocks_0, blocks_1, ...
    block = enc[SCAN_NAME] if scanned else enc[f"{SCAN_NAME}_0"]
    swiglu = "w12" in block["mlp"]
    mlp_dim = block["mlp"]["w3" if swiglu else "fc2"]["kernel"].shape[-2]
    return dict(image_size=grid * patch, patch_size=patch, width=width, depth=layer_count(enc),
                num_heads=block["attn"]["query"]["kernel"].shape[-2], mlp_ratio=mlp_dim / width, mlp_dim=mlp_dim,
                mlp_activation="swiglu" if swiglu else "gelu", layerscale_init=1e-5 if "ls1" in block else None,
                num_register_tokens=enc["register_tokens"].shape[1] if "register_tokens" in enc else 0,
                no_embed_class=no_embed_class, scan=scanned)
