"""UNI's released weights (Chen et al., "Towards a general-purpose foundation model for computational
pathology", Nat. Med. 2024; mahmoodlab/UNI and mahmoodlab/UNI2-h) -> a medjax Flax model.

    model, variables = medjax.convert.uni.load("UNI/pytorch_model.bin")    # or a .safetensors file / directory
    features = model.apply(variables, images)   # images (batch, H, W, 3), ImageNet-normalised -> (batch, 1024)

The model, `medjax.models.uni.UNIEncoder` (timm's VisionTransformer as UNI creates it, on
`medjax.nn.vit.ViTEncoder`; re-exported here with `uni_model`, `UNI_VIT_L16` and `UNI2_H`), is filled from
timm's state dict, in the scanned layout (`encoder/blocks`, leading layer axis) or the unrolled one
(`encoder/blocks_{i}`) as the model's `scan` says. The architecture is read off the state dict
(`timm_fields_from_state_dict`): width, patch, depth and image size from the tensors' shapes, num_heads =
width / 64 (UNI: 1024 / 16, UNI2-h: 1536 / 24), register tokens (`reg_token`), `no_embed_class` (a position
table without the class token's row), a packed SwiGLU MLP (`mlp.fc1` twice as wide as `mlp.fc2`'s input:
timm `SwiGLUPacked`, SiLU gate first) and LayerScale; so UNI (ViT-L/16) and UNI2-h (ViT-H/14, 8 registers,
SwiGLU) load with no arguments. Keyword fields override what is read (e.g. num_heads of a tiny test ViT).
Converted models take any image size (timm's `dynamic_img_size`: position embeddings resized bicubically
with antialiasing). Every missing or unexpected key and every shape mismatch is reported by name; a
classifier `head.*` is skipped (listed in the report). `medjax.convert.dinov2` reuses this mapping for
DINOv2 training checkpoints, `medjax.convert.export_timm` inverts it.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert.torch_io import (KeyReport, ParamMap, apply_mapping, attention_params, check_keys, copy_param,
                                     layer_norm_params, linear_params, read_state_dict, split_fused_qkv)
from medjax.models.uni import ARCH_FIELDS, UNI2_H, UNI_VIT_L16, UNIEncoder, uni_model

__all__ = ["UNI2_H", "UNI_VIT_L16", "UNIEncoder", "load", "load_with_report", "load_state_dict_with_report",
           "param_shapes", "timm_checkpoint_shapes", "timm_fields_from_state_dict", "timm_vit_map", "uni_model"]
from medjax.nn import layer_stack, transformer

Dtype = Any
_log = logging.getLogger(__name__)

_IGNORED = (r"head\.(weight|bias)",)  # a classifier on top of the feature, not part of it


def param_shapes(model: UNIEncoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of `model.init`, computed abstractly (jax.eval_shape; nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def timm_qkv_names(i: int) -> dict[str, str]:
    """Flax projection -> the per-projection key that `torch_io.split_fused_qkv` makes from timm's fused `attn.qkv`."""
    return {"query": f"blocks.{i}.attn.q", "key": f"blocks.{i}.attn.k", "value": f"blocks.{i}.attn.v",
            "out": f"blocks.{i}.attn.proj"}


def timm_vit_map(model: UNIEncoder, shapes) -> dict[str, ParamMap]:
    """timm VisionTransformer state-dict keys (fused qkv split into q / k / v) -> Flax param paths of the
    unrolled layout (`encoder/blocks_{i}`; `load` stacks them on axis 0 into `encoder/blocks` for a scanned
    model). `shapes`: `param_shapes(model)`, either layout."""
    shapes = transformer.unrolled_shapes(shapes)
    enc = ("encoder",)
    p = model.patch_size
    kernel = enc + ("patch_embed", "proj", "kernel")
    entries = {
        "cls_token": copy_param(enc + ("cls_token",), shapes),
        "pos_embed": copy_param(enc + ("pos_embed",), shapes),
        **({"reg_token": copy_param(enc + ("register_tokens",), shapes)} if model.num_register_tokens else {}),
        # Conv2d weight (width, 3, p, p) -> Flax Conv kernel (p, p, 3, width).
        "patch_embed.proj.weight": ParamMap(kernel, (model.width, 3, p, p), lambda a: a.transpose(2, 3, 1, 0)),
        "patch_embed.proj.bias": copy_param(enc + ("patch_embed", "proj", "bias"), shapes),
    }
    for i in range(model.depth):
        src, dst = f"blocks.{i}", enc + (f"blocks_{i}",)
        entries |= layer_norm_params(f"{src}.norm1", dst + ("norm1",), shapes)
        entries |= attention_params(timm_qkv_names(i), dst + ("attn",), shapes)
        entries |= layer_norm_params(f"{src}.norm2", dst + ("norm2",), shapes)
        hidden, out = ("w12", "w3") if model.mlp_activation == "swiglu" else ("fc1", "fc2")  # SwiGLUPacked: fc1, fc2
        entries |= linear_params(f"{src}.mlp.fc1", dst + ("mlp", hidden), shapes)
        entries |= linear_params(f"{src}.mlp.fc2", dst + ("mlp", out), shapes)
        if model.layerscale_init is not None:
            entries[f"{src}.ls1.gamma"] = copy_param(dst + ("ls1",), shapes)
            entries[f"{src}.ls2.gamma"] = copy_param(dst + ("ls2",), shapes)
    entries |= layer_norm_params("norm", enc + ("norm",), shapes)
    return entries


def timm_checkpoint_shapes(model: UNIEncoder, mapping: Mapping[str, ParamMap]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the timm state dict this model expects (fused `attn.qkv` as timm saves it)."""
    expected = {key: entry.torch_shape for key, entry in mapping.items() if not key.endswith(
        tuple(f".attn.{x}.{t}" for x in "qkv" for t in ("weight", "bias")))}
    for i in range(model.depth):
        expected[f"blocks.{i}.attn.qkv.weight"] = (3 * model.width, model.width)
        expected[f"blocks.{i}.attn.qkv.bias"] = (3 * model.width,)
    return expected


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _square_side(n: int) -> int | None:
    side = int(round(n ** 0.5))
    return side if n > 0 and side * side == n else None


def timm_fields_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> dict:
    """UNIEncoder fields of a timm VisionTransformer state dict (module doc); num_heads None when the width is
    not a multiple of 64 (then it must be given). Also reads DINOv2's layout (registers without position
    embeddings, the class token with one), which `medjax.convert.dinov2` brings to these keys."""
    def tensor(key):
        if key not in state:
            raise ValueError(f"{source}: no {key!r}; expected a timm VisionTransformer state dict (keys cls_token, "
                             f"pos_embed, patch_embed.proj.weight, blocks.N...), found {sorted(state)[:6]}...")
        return np.shape(state[key])

    proj = tensor("patch_embed.proj.weight")  # (width, 3, p, p)
    width, patch = int(proj[0]), int(proj[-1])
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth < 1:
        raise ValueError(f"{source}: no transformer blocks (keys blocks.N.*)")
    registers = int(tensor("reg_token")[1]) if "reg_token" in state else 0
    positions = int(tensor("pos_embed")[1])
    if _square_side(positions):  # timm no_embed_class (UNI2-h): patches only
        no_embed_class, grid = True, _square_side(positions)
    elif _square_side(positions - 1):  # [cls, patches] (UNI, DINOv2; DINOv2's registers have no position)
        no_embed_class, grid = False, _square_side(positions - 1)
    else:
        raise ValueError(f"{source}: pos_embed has {positions} positions: neither a square patch grid nor one "
                         f"plus the class token" + (f" (timm's registers-with-positions layout, {registers} register "
                                                    "tokens inside pos_embed, is not supported)" if registers else ""))
    fc1, fc2 = tensor("blocks.0.mlp.fc1.weight"), tensor("blocks.0.mlp.fc2.weight")
    swiglu = fc1[0] == 2 * fc2[1]  # timm SwiGLUPacked / DINOv2 SwiGLUFFNFused: one fc1 holding gate and value
    mlp_dim = int(fc2[1])
    return dict(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                num_heads=width // 64 if width % 64 == 0 else None, mlp_ratio=mlp_dim / width, mlp_dim=mlp_dim,
                mlp_activation="swiglu" if swiglu else "gelu",
                layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None, num_register_tokens=registers,
                no_embed_class=no_embed_class)


def load_state_dict_with_report(state: Mapping[str, np.ndarray], source: str, *, dtype: Dtype = jnp.float32,
                                param_dtype: Dtype = jnp.float32, ignore: tuple[str, ...] = _IGNORED,
                                **overrides) -> tuple[UNIEncoder, dict, KeyReport]:
    """`load_with_report` on a state dict already read (timm keys); `source` names it in errors."""
    fields = {**timm_fields_from_state_dict(state, source), **overrides}
    if fields["num_heads"] is None:
        raise ValueError(f"{source}: width {fields['width']} is not a multiple of 64; pass num_heads=")
    model = uni_model(dtype=dtype, param_dtype=param_dtype, **fields)
    shapes = transformer.unrolled_shapes(param_shapes(model))  # timm's blocks.{i} -> blocks_{i}; stacked below
    mapping = timm_vit_map(model, shapes)
    report = check_keys(timm_checkpoint_shapes(model, mapping), {k: tuple(np.shape(v)) for k, v in state.items()},
                        ignore=ignore)
    report.raise_if_problems(f"{source} (timm ViT: {', '.join(f'{k}={getattr(model, k)}' for k in ARCH_FIELDS)})")
    used = {key: value for key, value in state.items() if key not in report.ignored}
    params, _ = apply_mapping(shapes, mapping, split_fused_qkv(used, (f"blocks.{i}" for i in range(model.depth))), source, param_dtype=param_dtype)
    if layer_stack.resolve_scan(model.scan, model.depth):
        params = transformer.stack_layers(params)  # encoder/blocks_{i}/... -> encoder/blocks/... (axis 0: layer)
    if report.ignored:
        _log.info("%s: ignored %d tensors that are not part of the feature: %s", source, len(report.ignored),
                  ", ".join(report.ignored))
    return model, {"params": params}, report


def load_with_report(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                     **overrides) -> tuple[UNIEncoder, dict, KeyReport]:
    """`load`, also returning the key report (its `ignored` lists the checkpoint keys not used)."""
    return load_state_dict_with_report(read_state_dict(path), path, dtype=dtype, param_dtype=param_dtype, **overrides)


def load(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         **overrides) -> tuple[UNIEncoder, dict]:
    """(model, variables) from UNI's or UNI2-h's `pytorch_model.bin` (needs the torch extra), a `.safetensors`
    file or a directory holding one; the architecture is read off the state dict, `overrides` replace fields."""
    model, variables, _ = load_with_report(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    return model, variables
