"""UNI's released weights (Chen et al., "Towards a general-purpose foundation model for computational
pathology", Nat. Med. 2024; mahmoodlab/UNI) -> a medjax Flax model.

    model, variables = medjax.convert.uni.load("UNI/pytorch_model.bin")    # or a .safetensors file / directory
    features = model.apply(variables, images)   # images (batch, 224, 224, 3), ImageNet-normalised -> (batch, 1024)

The model, `medjax.models.uni.UNIEncoder` (timm's `vit_large_patch16_224` as UNI creates it, on
`medjax.nn.vit.ViTEncoder`; re-exported here with `uni_model` and `UNI_VIT_L16`), is filled from timm's
state dict, in the scanned layout (`encoder/blocks`, leading layer axis) or the unrolled one
(`encoder/blocks_{i}`) as the model's `scan` says. Keyword overrides of `UNI_VIT_L16` convert other timm
ViTs with the same layout (e.g. the tiny ones of the parity test). Every missing or unexpected key and
every shape mismatch is reported by name; a classifier `head.*` is skipped (listed in the report).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert.torch_io import (KeyReport, ParamMap, apply_mapping, attention_params, check_keys, copy_param,
                                     layer_norm_params, linear_params, read_state_dict)
from medjax.models.uni import UNI_VIT_L16, UNIEncoder, uni_model  # noqa: F401 (re-exported: the public names)
from medjax.nn import transformer

Dtype = Any
_log = logging.getLogger(__name__)

_IGNORED = (r"head\.(weight|bias)",)  # a classifier on top of the feature, not part of it


def param_shapes(model: UNIEncoder) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of `model.init`, computed abstractly (jax.eval_shape; nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _qkv_names(i: int) -> dict[str, str]:
    """Flax projection -> the per-projection key that `_split_qkv` makes from timm's fused `attn.qkv`."""
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
        # Conv2d weight (width, 3, p, p) -> Flax Conv kernel (p, p, 3, width).
        "patch_embed.proj.weight": ParamMap(kernel, (model.width, 3, p, p), lambda a: a.transpose(2, 3, 1, 0)),
        "patch_embed.proj.bias": copy_param(enc + ("patch_embed", "proj", "bias"), shapes),
    }
    for i in range(model.depth):
        src, dst = f"blocks.{i}", enc + (f"blocks_{i}",)
        entries |= layer_norm_params(f"{src}.norm1", dst + ("norm1",), shapes)
        entries |= attention_params(_qkv_names(i), dst + ("attn",), shapes)
        entries[f"{src}.ls1.gamma"] = copy_param(dst + ("ls1",), shapes)
        entries |= layer_norm_params(f"{src}.norm2", dst + ("norm2",), shapes)
        entries |= linear_params(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), shapes)
        entries |= linear_params(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), shapes)
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


def _split_qkv(state: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """timm's fused `attn.qkv` (rows q; k; v, each heads-major) -> `attn.q` / `attn.k` / `attn.v`."""
    state = dict(state)
    for i in range(depth):
        for kind in ("weight", "bias"):
            fused = state.pop(f"blocks.{i}.attn.qkv.{kind}")
            for name, part in zip("qkv", np.split(np.asarray(fused), 3, axis=0)):
                state[f"blocks.{i}.attn.{name}.{kind}"] = part
    return state


def load_with_report(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                     **overrides) -> tuple[UNIEncoder, dict, KeyReport]:
    """`load`, also returning the key report (its `ignored` lists the checkpoint keys not used)."""
    model = uni_model(dtype=dtype, param_dtype=param_dtype, **overrides)
    state = read_state_dict(path)
    shapes = transformer.unrolled_shapes(param_shapes(model))  # timm's blocks.{i} -> blocks_{i}; stacked below
    mapping = timm_vit_map(model, shapes)
    report = check_keys(timm_checkpoint_shapes(model, mapping), {k: tuple(v.shape) for k, v in state.items()},
                        ignore=_IGNORED)
    report.raise_if_problems(f"{path} (timm ViT: {', '.join(f'{k}={getattr(model, k)}' for k in UNI_VIT_L16)})")
    used = {key: value for key, value in state.items() if key not in report.ignored}
    params, _ = apply_mapping(shapes, mapping, _split_qkv(used, model.depth), path, param_dtype=param_dtype)
    if transformer.resolve_scan(model.scan, model.depth):
        params = transformer.stack_layers(params)  # encoder/blocks_{i}/... -> encoder/blocks/... (axis 0: layer)
    if report.ignored:
        _log.info("%s: ignored %d tensors that are not part of the feature: %s", path, len(report.ignored),
                  ", ".join(report.ignored))
    return model, {"params": params}, report


def load(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         **overrides) -> tuple[UNIEncoder, dict]:
    """(model, variables) from UNI's `pytorch_model.bin` (needs the torch extra), a `.safetensors` file or a
    directory holding one; `overrides` of `UNI_VIT_L16` for other timm ViTs of the same layout."""
    model, variables, _ = load_with_report(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    return model, variables
