"""The CLIP-Driven Universal Model's released weights (Liu et al., ICCV 2023; ljwztc/CLIP-Driven-Universal-Model,
`clip_driven_universal_swin_unetr.pth`, `clip_driven_universal_unet.pth`) and plain MONAI SwinUNETR state dicts
-> `medjax.models.universal.UniversalModel`.

    model, variables = medjax.convert.universal.load("clip_driven_universal_swin_unetr.pth")
    logits = model.apply(variables, x)     # x (batch, X, Y, Z, 1) -> (batch, X, Y, Z, 32), raw logits

`model.apply` gives the numbers of the original's forward on the channels-first input (x transposed to
(batch, 1, X, Y, Z)), with the logits transposed to channels last.

Checkpoints: `torch.load(f, weights_only=True)` (no pickled code runs); the state dict is the file itself or
its 'net' (the released files), 'state_dict' or 'model' entry; `.safetensors` files and Hugging-Face-style
directories are read without torch. Key names are compared without the DataParallel prefix `module.`; the
Swin UNETR backbone's keys are top-level as in the released file (`swinViT.*`, `encoder1.*`, `decoder5.*`;
a `backbone.` prefix, as the newest original code saves them, is also accepted); the UNet3D's are
`backbone.down_tr64.*` (bare `down_tr64.*`, e.g. Models Genesis, also accepted). The head: `precls_conv.0/2`
(GroupNorm, conv), `GAP.0/3`, `controller`, `text_to_vision` and `organ_embedding` (the frozen (32, 512)
CLIP text embeddings, a buffer -> variables["constants"]; `organ_embedding.weight` (32, 256) means the
rand_embedding ablation -> a param).

Every missing / unexpected key and every shape mismatch is reported by name (`KeyReport`). Not used, listed
as ignored: `relative_position_index` buffers (checked to equal the index of the window size),
MONAI's final `out.conv.conv.*` 1x1 conv, the UNet's `out_tr.*` and `num_batches_tracked` (and its running
statistics when `batch_stats_always`: the original's BatchNorm never reads them). A backbone-only checkpoint
(plain MONAI SwinUNETR) given to the Universal Model is an error naming the missing head keys unless
`allow_missing_head=True`, which initialises those params (seed `seed`) and still lists them as missing.
Swin UNETR's feature size, stage depths, heads and window size are read from the checkpoint's shapes.
`convert_monai_swin_unetr` turns a whole MONAI SwinUNETR state dict into `medjax.nn.swin_unetr.SwinUNETR`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from medjax.convert.torch_io import KeyReport, check_keys, read_state_dict
from medjax.models.universal import NUM_CLASSES, UniversalModel
from medjax.nn.swin import relative_position_index
from medjax.nn.swin_unetr import SwinUNETR, SwinUNETRBackbone
from medjax.nn.unet3d import UNet3DBackbone

Dtype = Any
_log = logging.getLogger(__name__)
_WHERE = "medjax/convert/universal.py"
BACKBONES = ("swinunetr", "unet")
_SWIN_PREFIXES = ("swinViT.", "encoder", "decoder", "out.")
_UNET_PREFIXES = ("down_tr", "up_tr", "out_tr.")
_HEAD_MODULES = {("precls_conv", "norm"): "precls_conv.0", ("precls_conv", "conv"): "precls_conv.2",
                 ("GAP", "norm"): "GAP.0", ("GAP", "conv"): "GAP.3"}
_MONAI_CONVOLUTIONS = ("conv1", "conv2", "conv3", "transp_conv")  # MONAI Convolution wraps its conv as `.conv`
_TRANSPOSED = ("transp_conv", "up_conv")
_IGNORED = (r"swinViT\.layers\d\.0\.blocks\.\d+\.attn\.relative_position_index",  # a buffer, verified
            r"out\.conv\.conv\.(weight|bias)",  # MONAI SwinUNETR's final 1x1 conv: not in the Universal Model
            r"backbone\.out_tr\..*", r"backbone\..*\.num_batches_tracked")
_RUNNING_STATS = (r"backbone\..*\.running_(mean|var)",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one checkpoint tensor goes: a variables path (collection first), the PyTorch shape, the layout."""

    path: tuple[str, ...]
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A checkpoint's tensors by name: `torch.load(weights_only=True)` of a `.pth`/`.pt`, taking its 'net',
    'state_dict' or 'model' entry when it has one; `.safetensors` files and directories via torch_io."""
    if os.path.isdir(path) or path.endswith((".safetensors", ".index.json")):
        return read_state_dict(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{path}: reading PyTorch files needs torch (`pip install -e .[torch]`)") from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip / unsupported-global errors
        raise ValueError(f"{path}: torch.load(weights_only=True) failed: {error}") from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict with 'net', got {type(obj).__name__}")
    for name in ("net", "state_dict", "model"):
        if isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    arrays = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: state-dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        value = value.detach().cpu()
        arrays[key] = (value.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                       else value.numpy())
    return arrays


def canonical_keys(state: Mapping[str, np.ndarray], backbone: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """State with canonical names (module doc) and canonical name -> original name."""
    out, names = {}, {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if backbone == "swinunetr" and name.startswith("backbone.") and name[9:].startswith(_SWIN_PREFIXES):
            name = name[len("backbone."):]
        if backbone == "unet" and name.startswith(_UNET_PREFIXES):
            name = "backbone." + name
        if name in out:
            raise ValueError(f"{_WHERE}: checkpoint keys {names[name]!r} and {key!r} both mean {name!r}")
        out[name], names[name] = value, key
    return out, names


def _layout(module: tuple[str, ...], leaf: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Callable]:
    """PyTorch shape and the PyTorch -> Flax layout change of one param."""
    if leaf == "kernel" and len(shape) == 5:
        if module[-1] in _TRANSPOSED:  # ConvTranspose3d weight (in, out, k, k, k) -> (k, k, k, in, out)
            return (shape[3], shape[4], *shape[:3]), lambda a: a.transpose(2, 3, 4, 0, 1)
        return (shape[4], shape[3], *shape[:3]), lambda a: a.transpose(2, 3, 4, 1, 0)  # Conv3d (out, in, k, k, k)
    if leaf == "kernel" and len(shape) == 2:  # nn.Linear (out, in)
        return shape[::-1], lambda a: a.T
    if leaf == "kernel" and module[-1] == "qkv":  # (3 * heads * head_dim, dim) -> (dim, 3, heads, head_dim)
        return (int(np.prod(shape[1:])), shape[0]), lambda a: a.T.reshape(shape)
    if leaf == "bias" and module[-1] == "qkv":
        return (int(np.prod(shape)),), lambda a: a.reshape(shape)
    if leaf == "kernel" and module[-1] == "proj" and len(shape) == 3:  # (dim, heads * head_dim) -> (heads, hd, dim)
        return (shape[2], shape[0] * shape[1]), lambda a: a.T.reshape(shape)
    return shape, lambda a: a


_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(path: tuple[str, ...], backbone: str) -> str:
    """The canonical checkpoint key of a variables path (collection first)."""
    collection, *module, leaf = path
    if collection == "constants":
        return leaf  # organ_embedding (buffer)
    if module and module[0] == "backbone":
        parts = [] if backbone == "swinunetr" else ["backbone"]
        for name in module[1:]:
            match = re.fullmatch(r"(blocks|ops)_(\d+)", name)
            parts += [name, "0"] if re.fullmatch(r"layers\d", name) else list(match.groups()) if match else [name]
        if backbone == "swinunetr" and module[-1] in _MONAI_CONVOLUTIONS:
            parts.append("conv")
    elif not module:
        return f"{leaf}.weight"  # rand_embedding's nn.Embedding organ_embedding
    else:
        parts = [_HEAD_MODULES.get(tuple(module), ".".join(module))]
    return ".".join(parts + [_LEAVES.get(leaf, leaf)])


def checkpoint_map(variable_shapes: Mapping[tuple[str, ...], tuple[int, ...]], backbone: str) -> dict[str, Entry]:
    """Canonical checkpoint key -> Entry for every variable of the model."""
    entries = {}
    for path, shape in variable_shapes.items():
        torch_shape, to_flax = _layout(tuple(path[1:-1]), path[-1], tuple(shape))
        key = torch_key(path, backbone)
        if key in entries:
            raise RuntimeError(f"{_WHERE}: variables {entries[key].path} and {path} both map to {key!r}")
        entries[key] = Entry(tuple(path), tuple(torch_shape), to_flax)
    return entries


def swin_config(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """SwinUNETRBackbone fields read from a canonical state dict's shapes (defaults for what is absent)."""
    config: dict[str, Any] = {}
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is not None:
        config["feature_size"] = int(embed.shape[0])
    depths, heads, windows = [], [], set()
    for stage in range(1, 5):
        pattern = re.compile(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.attn\.relative_position_bias_table")
        tables = {int(m.group(1)): state[k] for k in state if (m := pattern.fullmatch(k))}
        if not tables:
            return config
        depths.append(max(tables) + 1)
        heads.append(int(tables[0].shape[1]))
        windows.add(round(((tables[0].shape[0]) ** (1 / 3) + 1) / 2))
    if len(windows) == 1:
        config["window_size"] = windows.pop()
    return {**config, "depths": tuple(depths), "num_heads": tuple(heads)}


def universal_model(backbone: str = "swinunetr", *, num_classes: int = NUM_CLASSES, encoding: str = "word_embedding",
                    norm_groups: int = 16, legacy_merging: bool = True, batch_stats_always: bool = True,
                    kernel_impl: str = "auto", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                    **swin_fields) -> UniversalModel:
    """A UniversalModel on `backbone` ("swinunetr" with SwinUNETRBackbone `swin_fields`, or "unet")."""
    kinds = dict(dtype=dtype, param_dtype=param_dtype)
    if backbone == "swinunetr":
        net = SwinUNETRBackbone(legacy_merging=legacy_merging, **swin_fields, **kinds)
    elif backbone == "unet":
        net = UNet3DBackbone(batch_stats_always=batch_stats_always, **kinds)
    else:
        raise ValueError(f"{_WHERE}: backbone must be one of {BACKBONES}, got {backbone!r}")
    return UniversalModel(backbone=net, num_classes=num_classes, encoding=encoding, norm_groups=norm_groups,
                          kernel_impl=kernel_impl, **kinds)


class _ShapeOnlyBackbone(nn.Module):
    """Zeros of a backbone's output shapes (1 voxel): lets `UniversalModel.init` create just the head params,
    whose values do not depend on the backbone (Flax derives each param's key from its own path)."""

    channels: int
    channels4: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        b = x.shape[0]
        return jnp.zeros((b, 1, 1, 1, self.channels4), x.dtype), jnp.zeros((b, 1, 1, 1, self.channels), x.dtype)


def init_head(model: UniversalModel, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    """Flattened variables (collection first) of the head of `model`, freshly initialised with `seed`."""
    net = model.backbone
    channels = (net.feature_size, 16 * net.feature_size) if isinstance(net, SwinUNETRBackbone) else (64, 512)
    head = model.clone(backbone=_ShapeOnlyBackbone(*channels))
    variables = head.init(jax.random.key(seed), jnp.zeros((1, 1, 1, 1, 1), jnp.float32))
    return traverse_util.flatten_dict(nn.unbox(variables))


def _sample_input(model: UniversalModel) -> jax.ShapeDtypeStruct:
    side = 32 if isinstance(model.backbone, SwinUNETRBackbone) else 8
    return jax.ShapeDtypeStruct((1, side, side, side, 1), jnp.float32)


def variable_shapes(model: UniversalModel) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened variables path (collection first) -> shape, computed abstractly."""
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), _sample_input(model))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract)).items()}


def _check_position_index(state: Mapping[str, np.ndarray], window: int, source: str) -> None:
    expected = relative_position_index((window,) * 3)
    for key, value in state.items():
        if key.endswith("attn.relative_position_index") and not np.array_equal(np.asarray(value), expected):
            raise ValueError(f"{source}: {key} is not the relative position index of a {window}^3 window")


def convert_state_dict(state: Mapping[str, np.ndarray], backbone: str = "swinunetr", *, source: str = "checkpoint",
                       norm_groups: int = 16, legacy_merging: bool = True, batch_stats_always: bool = True,
                       allow_missing_head: bool = False, kernel_impl: str = "auto", seed: int = 0,
                       dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                       ) -> tuple[UniversalModel, dict, KeyReport]:
    """(model, variables, report) from a state dict of numpy arrays (see `load`)."""
    canonical, original = canonical_keys(state, backbone)
    encoding = "rand_embedding" if "organ_embedding.weight" in canonical else "word_embedding"
    embedding = canonical.get("organ_embedding.weight", canonical.get("organ_embedding"))
    swin_fields = swin_config(canonical) if backbone == "swinunetr" else {}
    model = universal_model(backbone, num_classes=NUM_CLASSES if embedding is None else int(embedding.shape[0]),
                            encoding=encoding, norm_groups=norm_groups, legacy_merging=legacy_merging,
                            batch_stats_always=batch_stats_always, kernel_impl=kernel_impl, dtype=dtype,
                            param_dtype=param_dtype, **swin_fields)
    shapes = variable_shapes(model)
    mapping = checkpoint_map(shapes, backbone)
    ignore = _IGNORED + (_RUNNING_STATS if batch_stats_always else ())
    report = check_keys({k: e.torch_shape for k, e in mapping.items()},
                        {k: tuple(np.shape(v)) for k, v in canonical.items()}, ignore=ignore)
    report = dataclasses.replace(report, unexpected=tuple(original[k] for k in report.unexpected))
    if backbone == "swinunetr":
        _check_position_index(canonical, model.backbone.window_size, source)
    head_missing = [k for k in report.missing if mapping[k].path[1] != "backbone"]
    tolerated = allow_missing_head and len(head_missing) == len(report.missing)
    if not report.ok and not (tolerated and not report.unexpected and not report.shape_mismatches):
        hint = ("\n  (a backbone-only checkpoint: pass allow_missing_head=True / --allow-missing-head to initialise "
                "the head)" if head_missing and len(head_missing) == len(report.missing) else "")
        raise ValueError(f"{source}: checkpoint does not match the Universal Model ({backbone}, {encoding}, "
                         f"{swin_fields or 'UNet3D'}):\n{report.describe()}{hint}")
    initial = {}
    if report.missing:
        initial = init_head(model, seed)
        _log.warning("%s: initialised %d missing head tensors: %s", source, len(report.missing),
                     ", ".join(report.missing))
    flat = {}
    for key, entry in mapping.items():
        value = entry.to_flax(np.asarray(canonical[key], np.float32)) if key in canonical else initial[entry.path]
        flat[entry.path] = jnp.asarray(value, param_dtype)
    if report.ignored:
        _log.info("%s: ignored %d tensors: %s", source, len(report.ignored), ", ".join(report.ignored))
    return model, traverse_util.unflatten_dict(flat), report


def convert_monai_swin_unetr(state: Mapping[str, np.ndarray], *, legacy_merging: bool = False,
                             source: str = "checkpoint", param_dtype: Dtype = jnp.float32,
                             **fields) -> tuple[SwinUNETR, dict, KeyReport]:
    """A whole MONAI SwinUNETR state dict (backbone + `out.conv.conv.*`) -> (medjax SwinUNETR, variables,
    report): the segmentation model itself, logits (batch, X, Y, Z, out_channels). Shapes give the fields;
    `fields` (dtype, remat) are passed on. Key names and problems are handled as in `convert_state_dict`."""
    canonical, original = canonical_keys(state, "swinunetr")
    out_weight = canonical.get("out.conv.conv.weight")
    if out_weight is None:
        raise ValueError(f"{source}: no out.conv.conv.weight: not a whole MONAI SwinUNETR state dict")
    embed = canonical.get("swinViT.patch_embed.proj.weight")
    in_channels = 1 if embed is None else int(embed.shape[1])
    model = SwinUNETR(int(out_weight.shape[0]), legacy_merging=legacy_merging, param_dtype=param_dtype,
                      **swin_config(canonical), **fields)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                              jax.ShapeDtypeStruct((1, 32, 32, 32, in_channels), jnp.float32))
    shapes = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(nn.unbox(abstract)).items()}
    mapping = {}
    for path, shape in shapes.items():  # ("params", "backbone", ...) as in the Universal Model; "out" -> out.conv.conv
        key = ("out.conv.conv." + _LEAVES[path[-1]] if path[1] == "out" else torch_key(path, "swinunetr"))
        mapping[key] = Entry(path, *_layout(tuple(path[1:-1]), path[-1], shape))
    report = check_keys({k: e.torch_shape for k, e in mapping.items()},
                        {k: tuple(np.shape(v)) for k, v in canonical.items()}, ignore=_IGNORED[:1])
    report = dataclasses.replace(report, unexpected=tuple(original[k] for k in report.unexpected))
    report.raise_if_problems(f"{source} (MONAI SwinUNETR {swin_config(canonical)})")
    _check_position_index(canonical, model.window_size, source)
    flat = {e.path: jnp.asarray(e.to_flax(np.asarray(canonical[k], np.float32)), param_dtype)
            for k, e in mapping.items()}
    return model, traverse_util.unflatten_dict(flat), report


def load_with_report(path: str, backbone: str = "swinunetr", **kwargs) -> tuple[UniversalModel, dict, KeyReport]:
    """`load`, also returning the key report."""
    if backbone not in BACKBONES:
        raise ValueError(f"{_WHERE}: backbone must be one of {BACKBONES}, got {backbone!r}")
    return convert_state_dict(read_checkpoint(path), backbone, source=path, **kwargs)


def load(path: str, backbone: str = "swinunetr", **kwargs) -> tuple[UniversalModel, dict]:
    """(model, variables): `model.apply(variables, x)` maps x (batch, X, Y, Z, 1) to the logits (batch, X, Y,
    Z, classes). kwargs: norm_groups (16), legacy_merging (True), batch_stats_always (True, UNet3D),
    allow_missing_head (False), kernel_impl, seed, dtype, param_dtype (module docstring)."""
    model, variables, _ = load_with_report(path, backbone, **kwargs)
    return model, variables


__all__ = ["BACKBONES", "convert_monai_swin_unetr", "convert_state_dict", "load", "load_with_report", "read_checkpoint",
           "universal_model", "checkpoint_map", "torch_key", "swin_config"]
