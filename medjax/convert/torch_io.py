"""Reading PyTorch-side weight files into numpy, and checking a checkpoint's keys against a model.

- `.safetensors` files are read WITHOUT torch, through the `safetensors` package's numpy API
  (bfloat16 tensors, which numpy lacks, are read from the file's byte ranges as `ml_dtypes.bfloat16`).
- `pytorch_model.bin` / `.pth` / `.pt` files need torch (the `torch` extra) and are read with
  `torch.load(weights_only=True)`: no pickled code runs.
- A Hugging Face directory may hold one file or shards listed in `*.index.json` (`weight_map`).
- `check_keys` reports every missing key, unexpected key and shape mismatch by name.
- `ParamMap` and the layout helpers describe where each PyTorch tensor goes in a Flax param tree
  (nn.Linear (out, in) -> Dense kernel (in, out), fused heads -> DenseGeneral (embed, heads, kv), ...);
  `apply_mapping` checks a state dict against such a mapping and builds the nested params.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

# Weight files of a Hugging Face directory, in order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as numpy arrays (no torch needed)."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    bf16_keys = []
    try:
        with safe_open(path, framework="np") as handle:
            for key in handle.keys():
                if handle.get_slice(key).get_dtype() == "BF16":
                    bf16_keys.append(key)
                else:
                    tensors[key] = handle.get_tensor(key)
    except Exception as error:  # safetensors raises its own error types for corrupt headers / data
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    if bf16_keys:
        tensors.update(_read_safetensors_bf16(path, bf16_keys))
    return tensors


def _read_safetensors_bf16(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """bfloat16 tensors from the byte ranges in the safetensors header (8-byte length + JSON)."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        base = 8 + header_size
        tensors = {}
        for key in keys:
            begin, end = header[key]["data_offsets"]
            handle.seek(base + begin)
            data = np.frombuffer(handle.read(end - begin), dtype="<u2")
            tensors[key] = data.view(ml_dtypes.bfloat16).reshape(header[key]["shape"])
    return tensors


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (`pytorch_model.bin`, `.pth`) via `torch.load(weights_only=True)`."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{path}: reading PyTorch files needs torch; install the extra with "
                          "`pip install -e .[torch]` (torch==2.14.1)") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle / zip / runtime errors for bad files
        raise ValueError(f"{path}: torch.load(weights_only=True) failed: {error}") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(state).__name__}")
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            arrays[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arrays[key] = value.numpy()
    return arrays


def read_weight_file(path: str) -> dict[str, np.ndarray]:
    """One weight file, by extension: `.safetensors` via safetensors, anything else via torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weight file not found")
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch_file(path)


def weight_file(directory: str) -> str:
    """The weights of a Hugging Face directory: the first of model.safetensors,
    model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json that exists."""
    for name in _HF_WEIGHT_FILES:
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            return file
    raise FileNotFoundError(f"{directory}: no weight file; expected one of {', '.join(_HF_WEIGHT_FILES)}")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A checkpoint's tensors by name from a weight file, a shard index (`*.index.json`, shards merged)
    or a Hugging Face directory (its `weight_file`)."""
    if os.path.isdir(path):
        path = weight_file(path)
    return _read_index(path) if path.endswith(".index.json") else read_weight_file(path)


def _read_index(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path}: expected a JSON object with a 'weight_map' of name -> shard file "
                         f"({error!r})") from error
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_weight_file(os.path.join(os.path.dirname(index_path), shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index_path}: tensors listed in weight_map but absent from their shards: {missing}")
    return tensors


@dataclasses.dataclass(frozen=True)
class KeyReport:
    """What a checkpoint has against what a model expects, each entry by name."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # (key, expected, found)
    ignored: tuple[str, ...] = ()  # present, matched an ignore pattern, not used
    absent: tuple[str, ...] = ()  # expected, allowed to be missing: left out of the params for the model's init

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def describe(self) -> str:
        lines = [f"  missing ({len(self.missing)}): {', '.join(self.missing)}"] if self.missing else []
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, expected, found in self.shape_mismatches:
            lines.append(f"  shape mismatch: {key} has shape {found}, expected {expected}")
        return "\n".join(lines)

    def raise_if_problems(self, source: str) -> None:
        """ValueError naming `source` and listing every missing / unexpected key and shape mismatch."""
        if not self.ok:
            raise ValueError(f"{source}: checkpoint does not match the model:\n{self.describe()}")


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *,
               ignore: Iterable[str] = ()) -> KeyReport:
    """Compare expected key -> shape with found key -> shape.

    Found keys that are not expected and fully match one of the `ignore` regular expressions are
    listed as ignored instead of unexpected.
    """
    patterns = [re.compile(p) for p in ignore]
    extra = sorted(set(found) - set(expected))
    ignored = tuple(k for k in extra if any(p.fullmatch(k) for p in patterns))
    return KeyReport(
        missing=tuple(sorted(set(expected) - set(found))),
        unexpected=tuple(k for k in extra if k not in ignored),
        shape_mismatches=tuple((k, tuple(expected[k]), tuple(found[k])) for k in sorted(set(expected) & set(found))
                               if tuple(expected[k]) != tuple(found[k])),
        ignored=ignored,
    )


Path = tuple[str, ...]
Shapes = Mapping[Path, tuple[int, ...]]  # flattened Flax param path -> shape


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """Where one checkpoint tensor goes: the Flax param path, the tensor's expected (PyTorch) shape and
    the layout change to the Flax shape."""

    path: Path
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]


def copy_param(path: Path, shapes: Shapes) -> ParamMap:
    """Same layout (embeddings, biases, LayerNorm weight -> scale)."""
    return ParamMap(path, tuple(shapes[path]), lambda a: a)


def linear_param(path: Path, shapes: Shapes) -> ParamMap:
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    return ParamMap(path, tuple(shapes[path])[::-1], lambda a: a.T)


def heads_in_param(path: Path, shapes: Shapes) -> ParamMap:
    """q/k/v projection: weight (heads*kv, embed) -> kernel (embed, heads, kv); bias (heads*kv,) -> (heads, kv)."""
    shape = tuple(shapes[path])
    if len(shape) == 2:
        return ParamMap(path, (shape[0] * shape[1],), lambda a: a.reshape(shape))
    return ParamMap(path, (shape[1] * shape[2], shape[0]), lambda a: a.T.reshape(shape))


def heads_out_param(path: Path, shapes: Shapes) -> ParamMap:
    """Attention output projection: weight (embed, heads*kv) -> kernel (heads, kv, embed)."""
    shape = tuple(shapes[path])
    return ParamMap(path, (shape[2], shape[0] * shape[1]), lambda a: a.T.reshape(shape))


def layer_norm_params(name: str, path: Path, shapes: Shapes) -> dict[str, ParamMap]:
    """`name.weight` / `name.bias` of an nn.LayerNorm -> `path/scale`, `path/bias`."""
    return {f"{name}.weight": copy_param(path + ("scale",), shapes),
            f"{name}.bias": copy_param(path + ("bias",), shapes)}


def linear_params(name: str, path: Path, shapes: Shapes, bias: bool = True) -> dict[str, ParamMap]:
    """`name.weight` [/ `name.bias`] of an nn.Linear -> `path/kernel` [/ `path/bias`]."""
    entries = {f"{name}.weight": linear_param(path + ("kernel",), shapes)}
    if bias:
        entries[f"{name}.bias"] = copy_param(path + ("bias",), shapes)
    return entries


def attention_params(names: Mapping[str, str], path: Path, shapes: Shapes) -> dict[str, ParamMap]:
    """Four nn.Linear projections -> a flax `MultiHeadDotProductAttention` at `path`; `names` maps its
    submodules (query, key, value, out) to the checkpoint's module names."""
    entries = {}
    for flax_name, name in names.items():
        out = flax_name == "out"
        entries[f"{name}.weight"] = (heads_out_param if out else heads_in_param)(path + (flax_name, "kernel"), shapes)
        entries[f"{name}.bias"] = (copy_param if out else heads_in_param)(path + (flax_name, "bias"), shapes)
    return entries


def split_fused_qkv(state: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> dict[str, np.ndarray]:
    """timm's fused `P.attn.qkv.{weight,bias}` (rows q; k; v, each heads-major) -> `P.attn.q.*`, `P.attn.k.*`,
    `P.attn.v.*` for each block prefix P (a copy of `state`). A fused key that is absent is left for
    `apply_mapping` / `check_keys` to report under its split names."""
    state = dict(state)
    for prefix in prefixes:
        for kind in ("weight", "bias"):
            key = f"{prefix}.attn.qkv.{kind}"
            if key in state:
                for name, part in zip("qkv", np.split(np.asarray(state.pop(key)), 3, axis=0)):
                    state[f"{prefix}.attn.{name}.{kind}"] = part
    return state


def apply_mapping(shapes: Shapes, mapping: Mapping[str, ParamMap], state: Mapping[str, np.ndarray], source: str, *,
                  ignore: Iterable[str] = (), param_dtype: Any = jnp.float32) -> tuple[dict, KeyReport]:
    """Checkpoint tensors -> nested Flax params with the paths and shapes `shapes`.

    Raises a ValueError naming `source` and listing every missing / unexpected key (`ignore`: regular
    expressions of keys to skip) and every shape mismatch; returns the params and the `KeyReport`.
    """
    unmapped = set(shapes) ^ {entry.path for entry in mapping.values()}
    if unmapped:  # the mapping and the module disagree: a bug in the converter, not in the checkpoint
        raise RuntimeError(f"medjax/convert: the key mapping and the module's params differ at "
                           f"{sorted('/'.join(p) for p in unmapped)}")
    report = check_keys({key: entry.torch_shape for key, entry in mapping.items()},
                        {key: tuple(value.shape) for key, value in state.items()}, ignore=ignore)
    report.raise_if_problems(source)
    flat = {entry.path: jnp.asarray(entry.to_flax(np.asarray(state[key])), param_dtype)
            for key, entry in mapping.items()}
    return traverse_util.unflatten_dict(flat), report
