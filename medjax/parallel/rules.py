"""Logical-axis rules: model dimension names -> mesh axes, one table per sharding preset.

Modules annotate params with logical names (`embed`, `mlp`, `heads`, ...); the preset chosen
in config (`mesh.rules`) maps them onto the mesh `("data", "fsdp", "tensor")`. A mesh axis that
does not divide a dimension is dropped for that dimension (the array is replicated along it),
so tiny configs run on any mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medjax.parallel.mesh import BATCH_AXES

# "layers": the stacked layer axis of nn.scan'd blocks (medjax/nn/transformer.py), never sharded.
_ACTIVATIONS = (("batch", BATCH_AXES), ("length", None), ("voxels", None), ("layers", None))

PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallelism: params replicated.
    "dp": _ACTIVATIONS + (
        ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("channels", None), ("patch", None), ("classes", None), ("snps", None),
    ),
    # ZeRO-3 style: params and optimizer state split over `fsdp` along their model dimension.
    "fsdp": _ACTIVATIONS + (
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("channels", "fsdp"), ("patch", None), ("classes", None), ("snps", None),
    ),
    # FSDP plus Megatron-style tensor parallelism on heads / MLP hidden / vocab.
    "fsdp_tp": _ACTIVATIONS + (
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None), ("vocab", "tensor"),
        ("channels", "fsdp"), ("patch", None), ("classes", None), ("snps", None),
    ),
}


def logical_rules(preset: str) -> tuple[tuple[str, Any], ...]:
    if preset not in PRESETS:
        raise ValueError(f"mesh.rules: unknown sharding preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset]


def _fit_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide the dimension they shard (or that repeat)."""
    fitted, used = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep, size = [], 1
        for name in names:
            if name in used or dim % (size * mesh.shape[name]):
                continue
            keep.append(name)
            size *= mesh.shape[name]
        used.update(keep)
        fitted.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*fitted)


def logical_to_mesh_specs(boxed_abstract, mesh: Mesh, rules) -> Any:
    """Mesh PartitionSpecs for an (abstract) tree of `nn.Partitioned` params; unboxed leaves replicate."""
    logical = nn.get_partition_spec(boxed_abstract)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    return jax.tree.map(
        lambda spec, leaf: _fit_to_shape(spec, leaf.shape, mesh), mesh_specs, nn.meta.unbox(boxed_abstract),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def specs_to_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
