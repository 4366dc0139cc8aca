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
           "compiler_params", "round_up", "is_power_of_2", "fit_block", "pad_axis", "check_block",
           "ceil_log"]
