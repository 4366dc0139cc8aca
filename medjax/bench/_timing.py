"""Timing and compiled-memory helpers shared by the benchmarks (kernels and `bench step`).

`time_fn` measures wall time per call of an already-jitted function after warm-up calls
(which also compile it), blocking on the outputs. `compiled_memory` asks XLA for the memory
plan of `jax.jit(fn)` at the given arguments without running it; its `peak_bytes` is the
compiler's peak (arguments + outputs + temporaries live at once) where the backend reports one
that covers temporaries (GPU, TPU), else the upper bound arguments + outputs + temporaries
(XLA:CPU's reported peak leaves temporaries out).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)` over `iters` timed calls after `warmup` calls."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"medjax/bench/_timing.py time_fn: need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory plan for one compiled program, in bytes."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    peak_bytes: int  # the compiler's peak where it covers temporaries, else arguments + outputs + temps - aliased

    def describe(self) -> str:
        return (f"peak={mib(self.peak_bytes)} argument={mib(self.argument_bytes)} output={mib(self.output_bytes)} "
                f"temp={mib(self.temp_bytes)} alias={mib(self.alias_bytes)}")


def compiled_memory(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> CompiledMemory | None:
    """Memory plan of `jax.jit(fn, **jit_kwargs)` at `args` (arrays or ShapeDtypeStructs);
    None when the backend does not report one."""
    return memory_of(jax.jit(fn, **jit_kwargs).lower(*args).compile())


def memory_of(compiled: Any) -> CompiledMemory | None:
    """The memory plan of an already compiled program (`jax.jit(f).lower(...).compile()`); None when the
    backend does not report one."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    if isinstance(stats, Sequence):  # some backends report one entry per device program
        stats = stats[0]
    get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
    upper_bound = (get("argument_size_in_bytes") + get("output_size_in_bytes") + get("temp_size_in_bytes")
                   - get("alias_size_in_bytes"))
    peak = get("peak_memory_in_bytes")
    if peak < get("temp_size_in_bytes"):  # e.g. XLA:CPU reports arguments + outputs only
        peak = upper_bound
    return CompiledMemory(
        argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"), peak_bytes=peak)


def mib(n_bytes: float | None) -> str:
    """Bytes as MiB (KiB below 1 MiB), or 'n/a'."""
    if n_bytes is None:
        return "n/a"
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.1f} KiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator formatted as '2.41x', or 'n/a' when either is missing."""
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table of `rows` (cells formatted with str); with no rows, just the header
    (print rows with `markdown_row` as they are measured)."""
    lines = [markdown_row(headers), "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"medjax/bench/_timing.py markdown_table: row {row} has {len(row)} cells, "
                             f"expected {len(headers)}")
        lines.append(markdown_row(row))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One program's output (for correctness checks), median seconds and compiled memory."""

    output: Any
    seconds: float | None
    memory: CompiledMemory | None


def measure(fn: Callable[..., Any], *args: Any, timed: bool = True, warmup: int = 2, iters: int = 10) -> Measurement:
    """Runs `jax.jit(fn)(*args)` once and reads its compiled memory; when `timed`, also its median time."""
    jitted = jax.jit(fn)
    output = jax.block_until_ready(jitted(*args))
    seconds = time_fn(jitted, *args, warmup=warmup, iters=iters) if timed else None
    return Measurement(output, seconds, compiled_memory(fn, *args))


def relative_l2_error(reference: Any, candidate: Any) -> float:
    """max over the leaves of two pytrees of ||candidate - reference|| / ||reference|| (float32).

    An L2 measure, so that the rare entries where the two programs legitimately disagree (a ReLU
    pre-activation or a relation within rounding of its threshold) do not dominate it.
    """
    def one(r, c):
        r, c = r.astype(jnp.float32), c.astype(jnp.float32)
        return jnp.linalg.norm((c - r).ravel()) / jnp.maximum(jnp.linalg.norm(r.ravel()), 1e-30)

    return float(max(jax.tree.leaves(jax.tree.map(one, reference, candidate))))


COMPARISON_HEADERS = ("reference ms", "kernel ms", "speedup", "reference peak", "kernel peak",
                      "memory ratio (ref/kernel)", "rel. L2 error")


def comparison_cells(reference: Callable[..., Any], kernel: Callable[..., Any], *args: Any, run_reference: bool,
                     run_kernel: bool, time_kernel: bool, warmup: int, iters: int) -> list[str]:
    """Cells under COMPARISON_HEADERS for one program pair. `time_kernel=False` (interpret mode)
    runs the kernel once, for the error and memory columns, and reports no kernel time."""
    ref = measure(reference, *args, warmup=warmup, iters=iters) if run_reference else None
    ker = measure(kernel, *args, timed=time_kernel, warmup=warmup, iters=iters) if run_kernel else None
    ref_s, ker_s = (ref.seconds if ref else None), (ker.seconds if ker else None)
    ref_m = ref.memory.peak_bytes if ref and ref.memory else None
    ker_m = ker.memory.peak_bytes if ker and ker.memory else None
    err = f"{relative_l2_error(ref.output, ker.output):.1e}" if ref and ker else "n/a"
    return [ms(ref_s), ms(ker_s), ratio(ref_s, ker_s), mib(ref_m), mib(ker_m), ratio(ref_m, ker_m), err]


def alternating_times(runs: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """name -> seconds of each of `repeats` timed calls. After `warmup` untimed rounds, each round calls every
    implementation once, in the order of `runs` (a, b, a, b, ...), so drift in a shared machine's speed falls
    on all of them alike. Every `runs` value must block until its work is done."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"medjax/bench/_timing.py alternating_times: need repeats >= 1 and warmup >= 0, "
                         f"got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


@dataclasses.dataclass(frozen=True)
class TimeSummary:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "TimeSummary":
        if not seconds:
            raise ValueError("medjax/bench/_timing.py TimeSummary.of: no timings")
        return cls(statistics.median(seconds), min(seconds), max(seconds))

    def describe(self) -> str:
        return f"{self.median:.3f} ({self.min:.3f}-{self.max:.3f})"
