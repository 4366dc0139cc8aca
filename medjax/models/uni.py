"""UNI's tile encoder (Chen et al., "Towards a general-purpose foundation model for computational pathology",
Nat. Med. 2024; mahmoodlab/UNI): timm's `vit_large_patch16_224` created with `init_values=1e-5`
(LayerScale) and `num_classes=0`.

ViT-L/16 (width 1024, 24 blocks, 16 heads, MLP 4096, GELU, qkv bias), a class token, learned position
embeddings for 14 x 14 + 1 tokens, pre-norm blocks x + ls1 * attn(LN(x)), x + ls2 * mlp(LN(x)), LayerNorm
eps 1e-6; its feature is the class token after the final norm (timm's `forward_features` +
`forward_head(pre_logits)` with global_pool="token"). Built from `medjax.nn.vit.ViTEncoder` (submodule
"encoder"), so the same params also initialise the library's ViT (e.g. for DINOv2 continued pretraining).
`medjax.convert.uni.load` fills it with the released weights.
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
# num_classes=0).
UNI_VIT_L16 = dict(image_size=224, patch_size=16, width=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                   layerscale_init=1e-5)
LAYOUT_FIELDS = ("scan", "remat")  # how the blocks run (nn.scan / nn.remat), not the architecture


class UNIEncoder(nn.Module):
    """Images (batch, H, W, 3), ImageNet-normalised -> the class token after the final LayerNorm
    (batch, width): UNI's tile feature (1024-d for ViT-L/16)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layerscale_init: float | None = 1e-5
    scan: bool | str | None = None  # ViTEncoder.scan: None scans 24 blocks (params under encoder/blocks)
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        tokens = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads,
                            self.mlp_ratio, class_token=True, layerscale_init=self.layerscale_init,
                            remat=self.remat, scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="encoder")(images, train=train)
        return tokens[:, 0]


def uni_model(*, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, **overrides) -> UNIEncoder:
    """UNIEncoder with UNI_VIT_L16's fields, `overrides` replacing some (unknown names are an error), plus
    the layout fields `scan` and `remat`."""
    unknown = sorted(set(overrides) - set(UNI_VIT_L16) - set(LAYOUT_FIELDS))
    if unknown:
        raise ValueError(f"medjax/models/uni.py: unknown model field(s) {unknown}; fields: "
                         f"{sorted(UNI_VIT_L16) + list(LAYOUT_FIELDS)}")
    return UNIEncoder(**{**UNI_VIT_L16, **overrides}, dtype=dtype, param_dtype=param_dtype)


def uni_fields_from_params(params: Any) -> dict:
    """UNIEncoder fields read off a converted params tree {"encoder": ...} (ViT shapes; LayerScale if present)."""
    enc = params["encoder"]
    width = enc["pos_embed"].shape[-1]
    patch = enc["patch_embed"]["proj"]["kernel"].shape[0]
    grid = int(round((enc["pos_embed"].shape[1] - 1) ** 0.5))
    scanned = SCAN_NAME in enc  # one nn.scan'd "blocks" (leading layer axis) or blocks_0, blocks_1, ...
    block = enc[SCAN_NAME] if scanned else enc[f"{SCAN_NAME}_0"]
    return dict(image_size=grid * patch, patch_size=patch, width=width, depth=layer_count(enc),
                num_heads=block["attn"]["query"]["kernel"].shape[-2],
                mlp_ratio=block["mlp"]["fc1"]["kernel"].shape[-1] / width,
                layerscale_init=1e-5 if "ls1" in block else None, scan=scanned)
