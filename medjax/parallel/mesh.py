"""Device mesh `("data", "fsdp", "tensor")` built from the config's `mesh` block (-1 = fill)."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve the configured sizes; exactly one may be -1 and takes what is left."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    if fills:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes {dict(zip(MESH_AXES, sizes))}")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh over `devices` (default: all; `mesh.num_devices` > 0 takes the first N)."""
    devices = list(jax.devices() if devices is None else devices)
    limit = int(mesh_cfg.get("num_devices", 0) or 0)
    if limit:
        if limit > len(devices):
            raise ValueError(f"mesh.num_devices={limit} but only {len(devices)} devices are visible")
        devices = devices[:limit]
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
