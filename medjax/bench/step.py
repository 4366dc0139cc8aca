"""python -m medjax.bench step --exp NAME [--variant V] [--steps N] [--synthetic] [--set k=v] [--compare k=v1,v2 ...]

Times one experiment's jitted train step on the current devices: ahead-of-time compile time,
compiled memory (from the compiler), steps/s and examples/s, FLOPs per step and device (XLA's cost
analysis of the compiled per-device program), MFU where the device's peak FLOP/s is known
(medjax/parallel/peaks.py, or --peak-tflops), and the process's peak RSS.

--compare KEY=V1,V2 (repeatable) runs one row per combination, e.g. the effect of bf16 compute:
    python -m medjax.bench step --exp mrm_retina --compare dtype=float32,bfloat16
and of any other config switch (a model's remat policy once it has one, mesh.rules, ...).
"""
from __future__ import annotations

import argparse
import itertools
import resource
import tempfile
import time


def settings_to_compare(items: list[str]) -> list[list[str]]:
    """["dtype=float32,bfloat16", "mesh.rules=dp,fsdp"] -> every combination as lists of overrides."""
    groups = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"error: --compare expects KEY=V1,V2,..., got {item!r}")
        groups.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*groups)]


def flops_per_step(compiled) -> float | None:
    """FLOPs of one call of the compiled (per-device) program, from XLA's cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not report it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def measure(config, steps: int, synthetic: bool = False) -> dict:
    """Compile and time `steps` train steps (after one warm-up step) of one config; `synthetic`: on the task's
    `init_batch()` (zeros of the training shapes) instead of its data pipeline."""
    import jax

    from medjax.tasks import build_task
    from medjax.trainer import Trainer, global_batch

    task = build_task(config, log=lambda *_: None)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, task, workdir)
        if synthetic:
            local = {k: v[:v.shape[0] // trainer.process_count] for k, v in task.init_batch().items()}
            batches = [global_batch(local, trainer.batch_sharding, trainer.process_count)]
        else:
            iterator = iter(task.train_data())
            batches = [global_batch(next(iterator), trainer.batch_sharding, trainer.process_count)
                       for _ in range(min(steps + 1, 4))]
        compiled, compile_s, memory = trainer.compile(batches[0])
        state = trainer.state
        with jax.set_mesh(trainer.mesh):
            state, metrics = compiled(state, batches[0])
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for i in range(steps):
                state, metrics = compiled(state, batches[(i + 1) % len(batches)])
            jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - start) / steps
        trainer.checkpointer.close()
    return {"compile_s": compile_s, "step_s": seconds, "memory": memory, "flops": flops_per_step(compiled),
            "params": sum(x.size for x in jax.tree.leaves(state["params"])), "unit": work_unit(task)}


def work_unit(task) -> tuple[str, int] | None:
    """What one example is worth, from the task's `work_per_example()`: ("tokens", n), ("voxels", n) or ("pixels", n)."""
    work = task.work_per_example()
    return None if work is None else (work[1], int(work[0]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--data", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--compare", action="append", default=[], metavar="KEY=V1,V2",
                   help="one row per value (repeatable: every combination), e.g. dtype=float32,bfloat16")
    p.add_argument("--synthetic", action="store_true",
                   help="time the step on the task's init_batch() (zeros of the training shapes): no data files "
                        "are read (the GPU suite); input files the task needs at build time get placeholders")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: the table for known GPUs/TPUs)")
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    from medjax.parallel import multihost

    multihost.initialize()  # several processes (e.g. under launch/*.sh) time one global step together

    import jax

    from medjax import config as config_lib
    from medjax.parallel import peaks
    from medjax.trainer import describe_memory

    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.data:
        overrides.append(f"data.dir={args.data}")
    device = jax.devices()[0]
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)  # only process 0 reports
    say("| exp | variant | settings | devices | params | batch | compile s | step s | steps/s | examples/s "
          "| tokens or voxels/s | GFLOP/step/device | MFU | arg+temp MiB | peak RSS MiB |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    memories = []
    placeholders = tempfile.TemporaryDirectory()
    for setting in settings_to_compare(args.compare):
        config = config_lib.get_config(args.exp, args.variant, overrides + setting)
        if args.synthetic:
            from medjax.bench.memory import placeholder_overrides

            config = config_lib.get_config(args.exp, args.variant, overrides + setting + [
                o for o in placeholder_overrides(config, placeholders.name)
                if not any(g.startswith(o.split("=")[0] + "=") for g in overrides + setting)])
        result = measure(config, args.steps, synthetic=args.synthetic)
        seconds, flops, memory = result["step_s"], result["flops"], result["memory"]
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peaks.peak_flops(device.device_kind, config.dtype)
        utilisation = peaks.mfu(flops, seconds, peak) if flops else None
        compiled_mib = ((memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
                        if memory is not None else float("nan"))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        batch = int(config.train.batch_size)
        unit = result["unit"]
        work = f"{unit[1] * batch / seconds:.4g} {unit[0]}/s" if unit else "n/a"
        say(f"| {args.exp} | {config.variant} | {' '.join(setting) or '-'} | {jax.device_count()} x "
              f"{device.device_kind} | {result['params'] / 1e6:.2f}M | {batch} | {result['compile_s']:.1f} | "
              f"{seconds:.3f} | {1 / seconds:.2f} | {batch / seconds:.1f} | {work} | "
              f"{flops / 1e9 if flops else float('nan'):.4g} | "
              f"{f'{100 * utilisation:.1f}%' if utilisation is not None else 'n/a (peak unknown)'} | "
              f"{compiled_mib:.1f} | {rss:.0f} |", flush=True)
        memories.append((" ".join(setting) or "-", describe_memory(memory)))
    for setting, text in memories:
        say(f"{setting}: {text}")
    placeholders.cleanup()
