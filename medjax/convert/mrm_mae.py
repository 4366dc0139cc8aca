"""An MAE pretraining state dict (facebookresearch/mae `models_mae.py`, the model MRM's authors train:
CityU-AIM-Group/MRM `models_mrm.py`) -> params of `medjax.models.mrm_mae.MAE`.

    params = medjax.convert.mrm_mae.convert_state_dict(state, model, source="checkpoint-799.pth")

Keys: the encoder's are timm VisionTransformer keys (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.*` with the fused `attn.qkv`, `norm.*`: `medjax.convert.uni.timm_vit_map`, moved under
`image_encoder/`), then `decoder_embed.*`, `mask_token`, `decoder_blocks.N.*` (timm Blocks, into
`decoder_block_N`), `decoder_norm.*`, `decoder_pred.*`. `decoder_pos_embed` is MAE's fixed sin-cos table,
a constant in medjax: it is checked against `medjax.nn.sincos.sincos_2d` (a different table is an error)
and not copied. The model's layer layout (scanned `image_encoder/blocks` or unrolled) is matched. Every
missing or unexpected key and every shape mismatch is reported by name.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert import uni as uni_convert
from medjax.convert.torch_io import (ParamMap, apply_mapping, attention_params, copy_param, layer_norm_params,
                                     linear_params, split_fused_qkv)
from medjax.models.mrm_mae import MAE
from medjax.nn import transformer
from medjax.nn.sincos import sincos_2d

ENCODER = "image_encoder"


def param_shapes(model: MAE) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of `model.init` (abstract: nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, x,
                                                   train=False), images)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _encoder_map(model: MAE, shapes) -> dict[str, ParamMap]:
    """timm's ViT keys -> `image_encoder/...` (the UNI converter's map of the same encoder, re-rooted)."""
    vit = uni_convert.uni_model(image_size=model.image_size, patch_size=model.patch_size, width=model.width,
                                depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
                                mlp_dim=int(model.width * model.mlp_ratio), layerscale_init=None,
                                num_register_tokens=0, no_embed_class=False, mlp_activation="gelu")
    encoder_shapes = {("encoder",) + p[1:]: s for p, s in shapes.items() if p[0] == ENCODER}
    return {key: dataclasses.replace(entry, path=(ENCODER,) + entry.path[1:])
            for key, entry in uni_convert.timm_vit_map(vit, encoder_shapes).items()}


def mae_map(model: MAE, shapes) -> dict[str, ParamMap]:
    """MAE checkpoint keys (fused qkv split into q / k / v) -> param paths of the unrolled layout."""
    entries = _encoder_map(model, shapes)
    entries |= linear_params("decoder_embed", ("decoder_embed",), shapes)
    entries["mask_token"] = copy_param(("mask_token",), shapes)
    for i in range(model.decoder_depth):
        src, dst = f"decoder_blocks.{i}", (f"decoder_block_{i}",)
        entries |= layer_norm_params(f"{src}.norm1", dst + ("norm1",), shapes)
        entries |= attention_params({"query": f"{src}.attn.q", "key": f"{src}.attn.k", "value": f"{src}.attn.v",
                                     "out": f"{src}.attn.proj"}, dst + ("attn",), shapes)
        entries |= layer_norm_params(f"{src}.norm2", dst + ("norm2",), shapes)
        entries |= linear_params(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), shapes)
        entries |= linear_params(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), shapes)
    entries |= layer_norm_params("decoder_norm", ("decoder_norm",), shapes)
    entries |= linear_params("decoder_pred", ("decoder_pred",), shapes)
    return entries


def convert_state_dict(state: Mapping[str, np.ndarray], model: MAE, source: str, *,
                       param_dtype=jnp.float32) -> dict:
    """MAE state dict -> `model`'s params (in its layer layout); raises naming the key problems."""
    state = {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}
    table = state.pop("decoder_pos_embed", None)
    grid = model.image_size // model.patch_size
    expected = np.asarray(sincos_2d(model.decoder_width, grid, class_token=True), np.float32)[None]
    if table is not None and (table.shape != expected.shape or not np.allclose(table, expected, atol=1e-5)):
        raise ValueError(f"{source}: decoder_pos_embed {table.shape} is not MAE's fixed 2D sin-cos table "
                         f"{expected.shape} (medjax's MAE decoder uses that table as a constant)")
    layout = param_shapes(model)
    shapes = transformer.unrolled_shapes(layout)
    blocks = [f"blocks.{i}" for i in range(model.depth)] + [f"decoder_blocks.{i}" for i in range(model.decoder_depth)]
    params, _ = apply_mapping(shapes, mae_map(model, shapes), split_fused_qkv(state, blocks), source, param_dtype=param_dtype)
    return transformer.match_layer_layout(params, traverse_util.unflatten_dict(layout))
