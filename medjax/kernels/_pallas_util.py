"""Helpers shared by medjax's Pallas kernels: implementation choice, target backend, padding.

Every kernel in medjax/kernels has one entry point with `impl` in {"auto", "reference",
"pallas"} (the experiment configs pass `config.kernels.impl`):
  - "reference": the plain-jnp definition;
  - "pallas": the Pallas kernel, lowered with Triton on GPU and Mosaic on TPU, and run by the
    Pallas interpreter (`interpret=True`) on any other backend (CPU);
  - "auto": the Pallas kernel on GPU/TPU, the reference elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

IMPLS = ("auto", "reference", "pallas")
BACKENDS = ("gpu", "tpu", "cpu")


def current_backend() -> str:
    """The default JAX backend as one of "gpu", "tpu", "cpu" (ROCm and CUDA are both "gpu")."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "cpu"


def resolve_backend(backend: str | None, where: str) -> str:
    """`backend` (or the current one when None) checked against BACKENDS."""
    if backend is None:
        return current_backend()
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def use_pallas(impl: str, where: str) -> bool:
    """True when `impl` selects the Pallas kernel on the current backend, False for the reference."""
    if impl not in IMPLS:
        raise ValueError(f"{where}: kernels.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return current_backend() in ("gpu", "tpu")
    return impl == "pallas"


def resolve_interpret(interpret: bool | None, backend: str) -> bool:
    """Interpret mode unless the kernel is compiled for a GPU or TPU."""
    if interpret is None:
        return backend not in ("gpu", "tpu")
    return bool(interpret)


def compiler_params(backend: str, parallel_dims: int, *, num_warps: int = 4, num_stages: int = 2):
    """Triton parameters on GPU; Mosaic parameters with every grid axis parallel on TPU."""
    if backend == "gpu":
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel_dims)
    return None


BATCH_MESH_AXES = ("data", "fsdp")  # medjax/parallel/rules.py: the batch is split over these
HEAD_MESH_AXIS = "tensor"  # attention heads (tensor parallelism)


def shard_map_over_batch(fn, args: tuple, *, head_dims: tuple, out_head_dim: int | None):
    """`fn(*args)`, run per device shard when traced under a mesh (`jax.set_mesh`, as in the trainer).

    A Pallas call is an opaque custom call to XLA's SPMD partitioner, which would gather sharded inputs
    onto every device and run the whole batch everywhere. Under a mesh we therefore `shard_map` it: dim 0
    (batch) of every argument and of the output is split over the mesh's data-parallel axes
    (`BATCH_MESH_AXES`, those whose sizes divide the batch), and the dims named in `head_dims` (one per
    argument, None = none) and `out_head_dim` of the output (which has the first argument's rank) over
    `HEAD_MESH_AXIS` when its size divides them. Every op here is independent per sample and per head,
    so no collectives are needed. Without a mesh (or on
    one device, or inside an enclosing shard_map) `fn(*args)` is called as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(*args)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch, batch_axes, split = args[0].shape[0], [], 1
    for name in BATCH_MESH_AXES:
        if sizes.get(name, 1) > 1 and batch % (split * sizes[name]) == 0:
            batch_axes.append(name)
            split *= sizes[name]
    heads = sizes.get(HEAD_MESH_AXIS, 1)
    head_dim_sizes = [a.shape[d] for a, d in zip(args, head_dims) if d is not None]
    shard_heads = heads > 1 and bool(head_dim_sizes) and all(n % heads == 0 for n in head_dim_sizes)
    if not batch_axes and not shard_heads:
        return fn(*args)

    def spec(ndim: int, head_dim: int | None):
        parts = [None] * ndim
        parts[0] = tuple(batch_axes) if batch_axes else None
        if shard_heads and head_dim is not None:
            parts[head_dim] = HEAD_MESH_AXIS
        return jax.sharding.PartitionSpec(*parts)

    out_ndim = args[0].ndim  # the kernels' outputs have the rank of their first argument
    in_specs = tuple(spec(a.ndim, d) for a, d in zip(args, head_dims))
    if mesh.explicit_axes:  # sharding-in-types meshes: put the arguments in the layout shard_map expects
        args = tuple(jax.reshard(a, s) for a, s in zip(args, in_specs))
    return jax.shard_map(fn, in_specs=in_specs, out_specs=spec(out_ndim, out_head_dim), check_vma=False)(*args)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fit_block(requested: int, extent: int, minimum: int) -> int:
    """The block size used along an axis of length `extent`: `requested`, shrunk to the next power
    of two above `extent` for short axes, never below `minimum`."""
    return max(minimum, min(requested, pl.next_power_of_2(max(extent, 1))))


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `x` along `axis` up to `size` (no copy when it already has that size)."""
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of shape {x.shape} down to {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def check_block(name: str, value: int, backend: str, where: str) -> None:
    """Triton tiles must be powers of two; Mosaic tiles multiples of 8 (sublanes)."""
    if value <= 0:
        raise ValueError(f"{where}: {name} must be positive, got {value}")
    if backend == "gpu" and not is_power_of_2(value):
        raise ValueError(f"{where}: {name}={value} must be a power of two for the Triton (GPU) kernel")
    if backend == "tpu" and value % 8:
        raise ValueError(f"{where}: {name}={value} must be a multiple of 8 for the Mosaic (TPU) kernel")


def ceil_log(width: int, base: int) -> int:
    """Passes of a `base`-ary search needed to shrink an integer interval of `width` to 1."""
    passes = 0
    while width > 1:
        width = -(-width // base)
        passes += 1
    return passes


__all__ = ["IMPLS", "BACKENDS", "current_backend", "resolve_backend", "use_pallas", "resolve_interpret",
           "compiler_params", "shard_map_over_batch", "round_up", "is_power_of_2", "fit_block", "pad_axis", "check_block",
           "ceil_log"]
