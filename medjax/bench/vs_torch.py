"""python -m medjax.bench vs-torch --exp NAME [--variant V] [--batch-size B] [--repeats R] [--set k=v]

One experiment's train step in medjax against its PyTorch original, side by side: the same architecture
with the same random weights (the converters' key maps; `medjax.bench.torch_rows` lists the rows and
their references), the same loss on the same random batch, AdamW on both (`medjax.bench.step_pair`).

1. Peak memory, each side in a child process of its own (so that one does not hide the other): the
   process's resident high-water mark over `--memory-steps` train steps, measured from just before the
   first step (Linux `/proc/self/clear_refs` resets it after the model is built, so the PyTorch weights
   that medjax converts from are not counted; the heap the build freed is handed back first,
   `release_free_heap`), and for medjax the compiler's planned peak
   (`compiled.memory_analysis()`, `medjax.bench._timing.CompiledMemory`). On a GPU the same children
   would report device memory; this bench runs the PyTorch side on the host's CPU cores.
2. In this process: both outputs in eval mode before any update (max |medjax - torch|), then one untimed
   step each (medjax's compile happens when its side is built, read back from the memory child's entry
   in a persistent compilation cache of the run when there is one; its time is reported), `--warmup` untimed
   rounds and `--repeats` timed rounds that ALTERNATE medjax, torch, medjax, torch, ... so that a shared
   machine's drift falls on both; per side the median, min and max seconds per step, and the ratio
   torch median / medjax median (> 1: medjax is faster).

Rows: universal_swin, universal_unet, uni_vitl16 (backbone + DINO head), pathchat_stage1/2 (its Llama),
ptunifier (MLM + ITM), mrm_retina / mrm_mae_baseline (the authors' MAE: timm ViT-B/16 + 512x8 decoder);
`--variant full` is the paper's shapes (e.g. 96^3 crops for the Universal Model). --json writes the
figures as JSON too.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

MEMORY_TAG = "VS_TORCH_MEMORY "  # the line a memory child prints its JSON result on
SIDES = ("medjax", "torch")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench vs-torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (both sides)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times both sides once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step of each")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example of the language-model rows")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--memory-steps", type=int, default=2, help="train steps each memory child runs")
    p.add_argument("--no-memory", action="store_true", help="skip the two memory children")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--memory-child", choices=SIDES, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    for name in ("batch_size", "repeats", "seq_len", "memory_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"error: --warmup must be >= 0, got {args.warmup}")
    return args


def child_command(args: argparse.Namespace, side: str) -> list[str]:
    """The command line of the memory child for `side`: the parent's row options, only that side built."""
    command = [sys.executable, "-m", "medjax.bench", "vs-torch", "--exp", args.exp, "--variant", args.variant,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--memory-steps", str(args.memory_steps), "--memory-child", side]
    for override in args.overrides:
        command += ["--set", override]
    return command


def parse_child_output(stdout: str) -> dict:
    """The JSON a memory child printed after MEMORY_TAG (its last such line); {} when there is none."""
    lines = [line for line in stdout.splitlines() if line.startswith(MEMORY_TAG)]
    return json.loads(lines[-1][len(MEMORY_TAG):]) if lines else {}


def speedup(torch_seconds: float | None, medjax_seconds: float | None) -> float | None:
    """torch / medjax seconds per step: > 1 when medjax is faster; None when either is missing or zero."""
    if not torch_seconds or not medjax_seconds:
        return None
    return torch_seconds / medjax_seconds


# ----------------------------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (since the last reset_peak_rss) or, without /proc, ru_maxrss (since the process started)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`), so that what the build freed (the PyTorch
    weights a medjax side converts from, the converters' copies: 0.7 GiB for mrm_retina full) does not stay in the
    resident set the step is measured against; False where there is no glibc. Both sides' children call it."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0) >= 0)
    except OSError:
        return False


def _config(args):
    from medjax import config as config_lib

    return config_lib.get_config(args.exp, args.variant, args.overrides)


def _build(args, sides: tuple[str, ...]):
    from medjax.bench.torch_rows import build_row

    return build_row(args.exp, _config(args), args.batch_size, sides, seq_len=args.seq_len)


def memory_child(args) -> dict:
    """Build one side, then its peak RSS over `memory_steps` steps (printed as JSON after MEMORY_TAG)."""
    side = args.memory_child
    row = _build(args, (side,))
    impl = row.sides[side]
    impl.step()  # the first step allocates what every later one reuses (optimizer state, ...)
    gc.collect()
    release_free_heap()
    before = (_status_kib("VmRSS") or 0) * 1024
    exact = reset_peak_rss()
    for _ in range(args.memory_steps):
        impl.step()
    result = {"side": side, "peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": before,
              "peak_from_step": exact, **impl.memory()}
    print(MEMORY_TAG + json.dumps(result), flush=True)
    return result


def use_compilation_cache(directory: str) -> None:
    """Share compiled executables between this process and its memory children (JAX's persistent cache, every
    compile cached), so that the medjax side is compiled once per run; an already configured cache is kept."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def measure_memory(args, cache_dir: str) -> dict[str, dict]:
    """side -> the memory child's figures (or {"error": ...})."""
    out = {}
    env = dict(os.environ, MEDJAX_VS_TORCH_CACHE=cache_dir)
    for side in SIDES:
        proc = subprocess.run(child_command(args, side), capture_output=True, text=True, env=env)
        result = parse_child_output(proc.stdout)
        if proc.returncode != 0 or not result:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            result = {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
        out[side] = result
    return out


# ----------------------------------------------------------------------------------------------- report

def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def report_rows(times: dict, losses: dict, memory: dict, build_s: dict) -> list[list[str]]:
    from medjax.bench._timing import TimeSummary

    medjax_median = TimeSummary.of(times["medjax"]).median if times.get("medjax") else None
    rows = []
    for side in SIDES:
        summary = TimeSummary.of(times[side])
        mem = memory.get(side, {})
        ratio = speedup(summary.median, medjax_median) if side == "torch" else 1.0
        rows.append([side, f"{build_s[side]:.1f}", f"{summary.median:.3f}", f"{summary.min:.3f}", f"{summary.max:.3f}",
                     f"{ratio:.2f}x" if ratio else "n/a", _gib(mem.get("compiled_peak_bytes")),
                     mem.get("error", _gib(mem.get("peak_rss_bytes"))), f"{losses[side][0]:.4g} -> {losses[side][-1]:.4g}"])
    return rows


HEADERS = ("impl", "build s (medjax: + compile)", "step s median", "min", "max", "torch/medjax",
           "compiled peak GiB", "peak RSS GiB (step)", "loss first -> last")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        if os.environ.get("MEDJAX_VS_TORCH_CACHE"):
            use_compilation_cache(os.environ["MEDJAX_VS_TORCH_CACHE"])
        memory_child(args)
        return
    from medjax.bench import _timing
    from medjax.bench.step_pair import max_abs_difference

    cache = tempfile.TemporaryDirectory(prefix="medjax-vs-torch-")
    use_compilation_cache(cache.name)
    memory = {} if args.no_memory else measure_memory(args, cache.name)
    build_s, sides = {}, {}
    row = None
    for side in SIDES:  # built one at a time to time each build; the weights are the same either way
        start = time.perf_counter()
        row = _build(args, (side,)) if side == "medjax" else _build(args, ("torch",))
        sides[side] = row.sides[side]
        build_s[side] = time.perf_counter() - start
    outputs = {side: impl.forward() for side, impl in sides.items()}
    difference = max_abs_difference(outputs["medjax"], outputs["torch"])
    scale = float(abs(outputs["torch"]).max())
    del outputs
    losses = {side: [impl.step()] for side, impl in sides.items()}

    def stepper(side):
        return lambda: losses[side].append(sides[side].step())

    times = _timing.alternating_times({side: stepper(side) for side in SIDES}, warmup=args.warmup,
                                      repeats=args.repeats)
    device = __import__("jax").devices()[0]
    print(f"vs-torch: {args.exp} ({args.variant}) {row.shapes}; {row.weights}; medjax on {device.platform} "
          f"({device.device_kind}), torch on CPU ({__import__('torch').get_num_threads()} threads); "
          f"params medjax {sides['medjax'].params / 1e6:.2f}M, torch {sides['torch'].params / 1e6:.2f}M")
    print(f"outputs before training: max |medjax - torch| = {difference:.2e} (max |torch| = {scale:.3g})")
    print(f"{args.repeats} alternating timed rounds after {args.warmup} warm-up round(s):")
    rows = report_rows(times, losses, memory, build_s)
    print(_timing.markdown_table(HEADERS, rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exp": args.exp, "variant": args.variant, "batch_size": args.batch_size, "shapes": row.shapes,
                       "weights": row.weights, "max_abs_difference": difference, "times": times, "losses": losses,
                       "memory": memory, "build_s": build_s, "host": os.uname().nodename}, f, indent=1)
    cache.cleanup()
