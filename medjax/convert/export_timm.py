"""A trained medjax ViT backbone -> a timm `VisionTransformer` state dict (the inverse of `medjax.convert.uni`), so a
UNI / DINOv2 run trained here is used where pathology code expects timm (UNI's README, CLAM's feature extraction).

    python -m medjax.convert export-timm --params runs/uni_vitl16-full --out uni_medjax.safetensors

`--params`: a `uni_pretrain` workdir / checkpoint (the teacher backbone: DINOv2 evaluates the teacher) or
converted encoder params ({"encoder": ...}). Every param goes back through the converter's own mapping
(`timm_vit_map`): each ParamMap's layout change is a permutation of the tensor's elements, inverted exactly;
q / k / v are fused into timm's `attn.qkv`. DINOv2's layout with registers (class token with a position
embedding, registers without) becomes timm's `no_embed_class` one as timm's `_convert_dinov2` does: the class
token's position embedding is added to the class token. `timm_kwargs` are what `timm.create_model` needs
(written beside the weights as `<out>.timm.json`):

    model = timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs)   # SwiGLU: mlp_layer=SwiGLUPacked
    model.load_state_dict(safetensors.torch.load_file("uni_medjax.safetensors"))

At the trained image size the features are the same; at other sizes timm resamples the position table its own way
(antialiased bicubic to the grid), as UNIEncoder does, not DINOv2's (offset 0.1, no antialiasing).
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from medjax.convert import uni as convert_uni
from medjax.convert.torch_io import ParamMap
from medjax.errors import MedjaxInputError
from medjax.models.uni import uni_fields_from_params
from medjax.nn import transformer


def encoder_params(tree: Any, source: str) -> dict:
    """The encoder's params (unrolled layout, numpy) from a params tree: a UNI pretraining run's teacher backbone or
    converted {"encoder": ...}; the iBOT mask token dropped."""
    tree = nn.unbox(tree.get("params", tree) if isinstance(tree, dict) else tree)
    if isinstance(tree, dict) and "teacher" in tree and "backbone" in tree["teacher"]:
        encoder = tree["teacher"]["backbone"]
    elif isinstance(tree, dict) and "encoder" in tree:
        encoder = tree["encoder"]
    else:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise MedjaxInputError(f"{source}: expected a UNI pretraining run's params ({{'teacher': {{'backbone': ...}}}}) "
                               f"or converted encoder params ({{'encoder': ...}}), got {keys}")
    encoder = {k: v for k, v in encoder.items() if k != "mask_token"}
    return transformer.unstack_layers(jax_to_numpy(encoder))


def jax_to_numpy(tree: Any) -> Any:
    return {k: jax_to_numpy(v) for k, v in tree.items()} if hasattr(tree, "items") else np.asarray(tree, np.float32)


def invert(entry: ParamMap, value: np.ndarray) -> np.ndarray:
    """The PyTorch tensor that `entry.to_flax` maps to `value`: to_flax is a permutation of elements (transpose,
    reshape), so mapping an index array through it gives where each element came from."""
    size = int(np.prod(entry.torch_shape))
    source = entry.to_flax(np.arange(size).reshape(entry.torch_shape))
    if source.shape != value.shape:
        raise ValueError(f"medjax/convert/export_timm.py: {entry.path} has shape {value.shape}, the mapping gives "
                         f"{source.shape}")
    out = np.empty(size, value.dtype)
    out[source.reshape(-1)] = value.reshape(-1)
    return out.reshape(entry.torch_shape)


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio r with int(width * r) == hidden (timm sizes fc1 as int(embed_dim * mlp_ratio))."""
    for r in (hidden / width, round(hidden / width, 6), (hidden + 0.5) / width):
        if int(width * r) == hidden:
            return r
    raise ValueError(f"no mlp_ratio gives {hidden} hidden units at width {width}")


def timm_state_dict(encoder: dict, source: str = "params") -> tuple[dict[str, np.ndarray], dict]:
    """(timm state dict, timm.create_model kwargs) of encoder params (`encoder_params`)."""
    fields = uni_fields_from_params({"encoder": encoder})
    model = convert_uni.uni_model(**{**fields, "scan": False})
    flat = traverse_util.flatten_dict({"encoder": encoder})
    shapes = {path: value.shape for path, value in flat.items()}
    expected = convert_uni.param_shapes(model)
    if shapes != expected:
        raise MedjaxInputError(f"{source}: the encoder's params do not form a UNIEncoder: "
                               f"{sorted('/'.join(p) for p in set(shapes) ^ set(expected))[:8]}")
    state = {key: invert(entry, flat[entry.path]) for key, entry in convert_uni.timm_vit_map(model, shapes).items()}
    for i in range(model.depth):  # q; k; v -> timm's fused qkv
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
                [state.pop(f"blocks.{i}.attn.{x}.{kind}") for x in "qkv"], axis=0)
    no_embed_class = model.no_embed_class
    if model.num_register_tokens and not no_embed_class:  # DINOv2's layout -> timm no_embed_class (_convert_dinov2)
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
        no_embed_class = True
    hidden = model.mlp_dim or int(model.mlp_ratio * model.width)
    swiglu = model.mlp_activation == "swiglu"
    kwargs = dict(img_size=model.image_size, patch_size=model.patch_size, embed_dim=model.width, depth=model.depth,
                  num_heads=model.num_heads, mlp_ratio=_mlp_ratio(2 * hidden if swiglu else hidden, model.width),
                  num_classes=0, dynamic_img_size=True)
    if model.layerscale_init is not None:
        kwargs["init_values"] = model.layerscale_init
    if model.num_register_tokens:
        kwargs["reg_tokens"] = model.num_register_tokens
    if no_embed_class:
        kwargs["no_embed_class"] = True
    if swiglu:
        kwargs |= {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    elif model.mlp_activation != "gelu":
        raise MedjaxInputError(f"{source}: MLP activation {model.mlp_activation!r} has no timm ViT equivalent here")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, kwargs


def export(params_path: str, out: str) -> dict:
    """Write the timm state dict of the backbone at `params_path` to `out` (.safetensors, or .bin / .pth with torch)
    and its kwargs to `<out>.timm.json`; returns the kwargs."""
    from medjax import checkpoint as checkpoint_lib

    if os.path.lexists(out):
        raise FileExistsError(f"--out {out} already exists; choose another --out or remove it (nothing was written)")
    tree = checkpoint_lib.restore_params(checkpoint_lib.params_dir(params_path))
    state, kwargs = timm_state_dict(encoder_params(tree, params_path), params_path)
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        if out.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(state, tmp)
        else:
            try:
                import torch
            except ImportError as error:
                raise ImportError(f"--out {out}: writing .bin / .pth needs torch; use a .safetensors name") from error
            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp)
        with open(f"{out}.timm.json", "w") as handle:
            json.dump({"model_args": kwargs, "source": os.path.abspath(params_path)}, handle, indent=1)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return kwargs
