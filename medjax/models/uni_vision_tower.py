"""UNI's ViT-L/16 as LLaVA's / PathChat's vision tower (Lu et al., Nature 2024: PathChat's vision encoder is
UNI-based; Chen et al., Nat. Med. 2024 for UNI): the tile encoder of `medjax.models.uni` run up to its
penultimate block, no final LayerNorm, all tokens returned -- the analogue of LLaVA-1.5's CLIP
`hidden_states[-2]` (Liu et al. 2024), which `medjax.models.llava.Llava` projects after dropping the class token.

    tokens = blocks[:feature_depth](embed(images))            (timm: the output of blocks[feature_depth - 1])
    out    = [tokens[:, 0], tokens[:, 1 + registers:]]        (class token, then the patches; registers dropped)

Params (`encoder/...`) are UNIEncoder's without the final `norm` and with `feature_depth` blocks, so a converted
UNI checkpoint (`medjax.convert.uni.load`) feeds it through `tower_variables`. Images are ImageNet-normalised
(UNI's transform; `medjax.tasks.pathchat_data.image_pixels(..., mean=IMAGENET_MEAN, std=IMAGENET_STD)`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.uni import ARCH_FIELDS, UNI_VIT_L16, UNIEncoder
from medjax.nn import layer_stack
from medjax.nn.transformer import SCAN_NAME
from medjax.nn.vit import ViTEncoder

Dtype = Any
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # UNI's transforms.Normalize (mahmoodlab/UNI README)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UNIVisionTower(nn.Module):
    """Images (batch, H, W, 3), ImageNet-normalised -> (batch, 1 + patches, width): the class token and the patch
    tokens after `feature_depth` of UNI's blocks (23 of ViT-L/16's 24: the penultimate layer)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    feature_depth: int = 23
    num_heads: int = 16
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    mlp_activation: str = "gelu"
    layerscale_init: float | None = 1e-5
    num_register_tokens: int = 0
    no_embed_class: bool = False
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = True
    scan: bool | str | None = None
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        encoder = ViTEncoder(self.image_size, self.patch_size, self.width, self.feature_depth, self.num_heads,
                             self.mlp_ratio, class_token=True, layerscale_init=self.layerscale_init,
                             remat=self.remat, scan=self.scan, num_register_tokens=self.num_register_tokens,
                             dynamic_image_size=True, interpolate_offset=self.interpolate_offset,
                             interpolate_antialias=self.interpolate_antialias, mlp_activation=self.mlp_activation,
                             mlp_dim=self.mlp_dim, no_embed_class=self.no_embed_class, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="encoder")
        tokens, _ = layer_stack.run_stack(encoder.blocks, encoder.embed(images), encoder.drop_path_rates())
        return jnp.concatenate([tokens[:, :1], tokens[:, 1 + self.num_register_tokens:]], axis=1)


def uni_vision_tower(feature_depth: int = 23, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                     **fields) -> UNIVisionTower:
    """The tower with UNI ViT-L/16's fields (`UNI_VIT_L16`), `fields` (UNIEncoder's ARCH_FIELDS, scan, remat)
    replacing some; refused when `feature_depth` is outside 1..depth."""
    fields = {**UNI_VIT_L16, **fields}
    depth = int(fields.pop("depth"))
    if not 1 <= int(feature_depth) <= depth:
        raise ValueError(f"model.vision_feature_depth={feature_depth}: expected 1..{depth} (the UNI ViT's blocks; "
                         f"{depth - 1} = the penultimate layer)")
    known = set(ARCH_FIELDS) | {"scan", "remat"}
    return UNIVisionTower(feature_depth=int(feature_depth), dtype=dtype, param_dtype=param_dtype,
                          **{k: v for k, v in fields.items() if k in known})


def tower_from_uni(model: UNIEncoder, feature_depth: int, *, dtype: Dtype | None = None) -> UNIVisionTower:
    """The tower of a (converted) UNIEncoder's architecture, running `feature_depth` of its blocks."""
    scanned = layer_stack.resolve_scan(model.scan, model.depth)  # the converted params' layout, kept when cut
    fields = {k: getattr(model, k) for k in ARCH_FIELDS} | {"scan": scanned, "remat": model.remat}
    return uni_vision_tower(feature_depth, dtype=model.dtype if dtype is None else dtype,
                            param_dtype=model.param_dtype, **fields)


def tower_variables(variables: dict, feature_depth: int) -> dict:
    """A UNIEncoder's variables {"params": {"encoder": ...}} cut to the tower's: the first `feature_depth`
    blocks (scanned: the leading layer axis sliced; unrolled: blocks_{i >= feature_depth} dropped), no final norm."""
    encoder = {k: v for k, v in variables["params"]["encoder"].items() if k != "norm"}
    if SCAN_NAME in encoder:
        encoder[SCAN_NAME] = jax.tree.map(lambda x: x[:feature_depth], encoder[SCAN_NAME])
    else:
        encoder = {k: v for k, v in encoder.items()
                   if not (k.startswith(f"{SCAN_NAME}_") and int(k.rsplit("_", 1)[1]) >= feature_depth)}
    return {"params": {"encoder": encoder}}
