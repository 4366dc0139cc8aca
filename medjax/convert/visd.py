"""ViSD-Boost's PyTorch weights (Cao et al., ICCV 2025; alibaba-damo-academy/ViSD-Boost) -> medjax variables.

`resnet3d_from_torch(state_dict, prefix)`: a MedicalNet ResNet state dict (`conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, `layer2.0.downsample.0.weight` ...) -> {"params", "batch_stats"} of
`medjax.nn.resnet3d.ResNet3D`: Conv3d weight (out, in, kd, kh, kw) -> kernel (kd, kh, kw, in, out); BatchNorm
weight / bias -> scale / bias, running_mean / running_var -> batch_stats mean / var; `num_batches_tracked`
is not needed (momentum 0.1 is fixed).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import traverse_util

_BLOCK = re.compile(r"^(layer\d+)\.(\d+)\.")


def _module_path(name: str) -> list[str]:
    """'layer2.0.downsample.1' -> ['layer2_0', 'downsample_1']."""
    name = _BLOCK.sub(lambda m: f"{m.group(1)}_{m.group(2)}.", name)
    return name.replace("downsample.", "downsample_").split(".")


def resnet3d_from_torch(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> dict:
    """{"params": ..., "batch_stats": ...} (nested dicts of numpy arrays) from the keys under `prefix`."""
    params, stats = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        module, _, leaf = key[len(prefix):].rpartition(".")
        path = tuple(_module_path(module))
        value = np.asarray(value)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 5:
            params[path + ("kernel",)] = value.transpose(2, 3, 4, 1, 0)
        elif leaf in ("weight", "bias") and value.ndim == 1:
            params[path + ("scale" if leaf == "weight" else "bias",)] = value
        elif leaf in ("running_mean", "running_var"):
            stats[path + (leaf.removeprefix("running_"),)] = value
        else:
            raise ValueError(f"medjax/convert/visd.py: {key!r} (shape {value.shape}) is not a MedicalNet ResNet tensor")
    return {"params": traverse_util.unflatten_dict(params), "batch_stats": traverse_util.unflatten_dict(stats)}
