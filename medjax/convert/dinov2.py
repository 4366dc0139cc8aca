"""DINOv2 training checkpoints (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
TMLR 2024; facebookresearch/dinov2) -> medjax params: a run of the original code (e.g. a UNI-style pathology
pretraining) continued, evaluated or used for feature extraction here.

    python -m medjax.convert dinov2 --torch OUTPUT/eval/training_124999/teacher_checkpoint.pth --out params/dino
    model, variables = medjax.convert.dinov2.load("teacher_checkpoint.pth")   # UNIEncoder + its params

What DINOv2 writes (`dinov2/train/train.py` `do_test`): `{"teacher": teacher.state_dict()}` with the
backbone under `backbone.` and the heads under `dino_head.` [`ibot_head.`]; its fvcore checkpoints
(`model_final.pth`) hold `{"model": {"student.…", "teacher.…"}}`, the hub files (`dinov2_vitl14_pretrain.pth`)
the bare backbone. All three are read (the teacher where there is one: DINOv2 evaluates the teacher).
Backbone keys (`dinov2/models/vision_transformer.py`): `cls_token`, `pos_embed` (class token + patches),
`register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.<i>.` -- or `blocks.<chunk>.<i>.` with
`block_chunks` (FSDP wrapping; `BlockChunk` keeps the global index i) -- with `norm1`, `attn.qkv`,
`attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`/`mlp.fc2` (`Mlp`) or `mlp.w12`/`mlp.w3` (`SwiGLUFFNFused`, gate
first), `ls2.gamma`, and `norm`. They are renamed to timm's (as timm's own `_convert_dinov2`: w12 -> fc1,
w3 -> fc2, register_tokens -> reg_token) and converted by `medjax.convert.uni`, keeping DINOv2's layout
(registers without position embeddings). The iBOT `mask_token` is not part of the encoder (listed as ignored).

Heads (`dinov2/layers/dino_head.py`): `mlp.0`, `mlp.2`, `mlp.4` (Linear, GELU between; `mlp` alone when
nlayers = 1) and the weight-normalised `last_layer` (`weight_g` (K, 1), `weight_v` (K, bottleneck); or the
parametrization keys `parametrizations.weight.original0/1`) -> `medjax.models.dinov2.DINOHead` params
(`mlp_<i>`, `last_layer/kernel` = v^T, `last_layer/gain` = g). The written tree is {"encoder": ...,
"dino_head": ..., ["ibot_head": ...]}: `evaluate --checkpoint`, `extract --params` read the encoder,
`uni_pretrain`'s `init=` puts the encoder into both backbones and the heads into both heads.

Position embeddings: the encoder is built with DINOv2's interpolation (`interpolate_offset` 0.1, no
antialiasing); params re-read from disk (`uni_fields_from_params`) get timm's resampling, identical at the
trained image size.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from medjax.convert import uni as convert_uni
from medjax.convert.torch_io import KeyReport, read_safetensors

Dtype = Any
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|module|_orig_mod)\.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_HEADS = ("dino_head", "ibot_head")


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The flat tensors of a DINOv2 checkpoint (module doc): the teacher's where the file has one."""
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        try:
            import torch
        except ImportError as error:
            raise ImportError(f"{path}: reading .pth files needs torch (`pip install -e .[torch]`)") from error
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle / zip / runtime errors of a bad file
            raise ValueError(f"{path}: torch.load(weights_only=True) failed: {error}") from error
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a dict (DINOv2's {{'teacher': state_dict}}), got {type(state).__name__}")
        if "teacher" in state and isinstance(state["teacher"], Mapping):  # teacher_checkpoint.pth
            state = state["teacher"]
        elif "model" in state and isinstance(state["model"], Mapping):  # fvcore model_*.pth: student + teacher
            model = state["model"]
            state = {k[len("teacher."):]: v for k, v in model.items() if k.startswith("teacher.")} or dict(model)
        arrays = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
            value = value.detach().cpu()
            arrays[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        state = arrays
    return {_WRAPPERS.sub("", key): np.asarray(value) for key, value in state.items()}


def split_checkpoint(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(backbone tensors with DINOv2's names, {head name: its tensors}); a bare backbone has no prefix."""
    if not any(key.startswith("backbone.") for key in state):
        return dict(state), {}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    heads = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")} for name in _HEADS}
    return backbone, {name: tensors for name, tensors in heads.items() if tensors}


def backbone_to_timm(backbone: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DINOv2 backbone keys -> timm's (module doc); the mask token stays under its name (ignored later)."""
    out = {}
    for key, value in backbone.items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out["reg_token" if key == "register_tokens" else key] = value
    return out


def head_params(tensors: Mapping[str, np.ndarray], source: str) -> dict:
    """DINOv2 `DINOHead` tensors -> `medjax.models.dinov2.DINOHead` params (learned gain included)."""
    linear = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"mlp\.(\d+)\.weight$", k))})
    names = [f"mlp.{i}" for i in linear] or (["mlp"] if "mlp.weight" in tensors else [])
    if not names:
        raise ValueError(f"{source}: head has no mlp.N.weight (DINOv2 DINOHead); keys {sorted(tensors)}")
    params = {}
    for j, name in enumerate(names):
        params[f"mlp_{j}"] = {"kernel": np.asarray(tensors[f"{name}.weight"]).T, "bias": np.asarray(tensors[f"{name}.bias"])}
    if "last_layer.weight_v" in tensors:
        v, g = tensors["last_layer.weight_v"], tensors["last_layer.weight_g"]
    elif "last_layer.parametrizations.weight.original1" in tensors:
        v, g = tensors["last_layer.parametrizations.weight.original1"], tensors["last_layer.parametrizations.weight.original0"]
    elif "last_layer.weight" in tensors:  # a plain Linear: its rows' norms as the gain
        v = tensors["last_layer.weight"]
        g = np.linalg.norm(v, axis=1, keepdims=True)
    else:
        raise ValueError(f"{source}: head has no last_layer.weight_g / weight_v (weight-normalised last layer)")
    params["last_layer"] = {"kernel": np.asarray(v, np.float32).T, "gain": np.asarray(g, np.float32).reshape(-1)}
    return params


def load_with_report(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                     **overrides) -> tuple[convert_uni.UNIEncoder, dict, KeyReport]:
    """(encoder model, {"params": {"encoder", "dino_head"[, "ibot_head"]}}, key report of the backbone)."""
    backbone, heads = split_checkpoint(read_checkpoint(path))
    state = backbone_to_timm(backbone)
    fields = dict(interpolate_offset=0.1, interpolate_antialias=False)  # DINOv2's interpolate_pos_encoding
    model, variables, report = convert_uni.load_state_dict_with_report(
        state, f"{path} (DINOv2 backbone)", dtype=dtype, param_dtype=param_dtype,
        ignore=convert_uni._IGNORED + (r"mask_token",), **{**fields, **overrides})
    params = dict(variables["params"])
    for name, tensors in heads.items():
        params[name] = {k: {p: jnp.asarray(a, param_dtype) for p, a in v.items()}
                        for k, v in head_params(tensors, f"{path} ({name})").items()}
    return model, {"params": params}, report


def load(path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         **overrides) -> tuple[convert_uni.UNIEncoder, dict]:
    """(UNIEncoder, variables) of a DINOv2 checkpoint's teacher backbone (+ its heads in the params)."""
    model, variables, _ = load_with_report(path, dtype=dtype, param_dtype=param_dtype, **overrides)
    return model, variables
