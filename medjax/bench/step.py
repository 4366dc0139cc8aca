"""python -m medjax.bench step --exp NAME [--variant V] [--steps N] [--synthetic] [--set k=v] [--compare k=v1,v2 ...]
                              [--aot-only] [--mesh fsdp=4,tensor=2]

Times one experiment's jitted train step on the current devices: ahead-of-time compile time,
compiled memory (from the compiler), steps/s and examples/s, FLOPs per step and device (XLA's cost
analysis of the compiled per-device program), MFU where the device's peak FLOP/s is known
(medjax/parallel/peaks.py, or --peak-tflops), and the process's peak RSS.

--aot-only compiles the step ahead of time from abstract shapes (`medjax.bench.memory.plan_step`: nothing is
allocated, nothing runs) and prints XLA's per-device memory plan (arguments = params + optimizer state +
batch shard, outputs, temporaries, planned peak) beside the param count and the mesh: a pod-scale plan on one
host, e.g. with 8 fake CPU devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m medjax.bench step --exp pathchat_stage2 \
        --variant full --aot-only --mesh fsdp=4,tensor=2
--mesh AXIS=N,... sets mesh.data / mesh.fsdp / mesh.tensor (the rest 1) and, with tensor > 1, mesh.rules=fsdp_tp
unless --set gives the rules.

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
            local = [{k: v[:v.shape[0] // trainer.process_count] for k, v in task.init_batch().items()}]
        else:
            local = batches_of_one_shape(iter(task.train_data()), min(steps + 1, 4))
        batches = [global_batch(b, trainer.batch_sharding, trainer.process_count) for b in local]
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
    unit = work_unit(task)
    if unit is not None:  # the work the timed batches hold (length buckets: their real tokens, not max_length's)
        work = sum(task.work_in_batch(local[(i + 1) % len(local)]) for i in range(steps)) * trainer.process_count
        unit = (unit[0], work / steps / int(config.train.batch_size))
    return {"compile_s": compile_s, "step_s": seconds, "memory": memory, "flops": flops_per_step(compiled),
            "params": sum(x.size for x in jax.tree.leaves(state["params"])), "unit": unit}


def batches_of_one_shape(iterator, count: int, draws: int = 64) -> list[dict]:
    """`count` host batches of the first batch's array shapes (one compiled step is timed: with length buckets,
    batches padded to the first batch's bucket), from at most `draws` batches of the iterator."""
    from medjax.trainer import batch_shapes

    first = next(iterator)
    out, key = [first], batch_shapes(first)
    for _ in range(draws - 1):
        if len(out) == count:
            break
        batch = next(iterator, None)
        if batch is None:
            break
        if batch_shapes(batch) == key:
            out.append(batch)
    return out


MESH_AXES = ("data", "fsdp", "tensor")


def mesh_overrides(spec: str, overrides: list[str]) -> list[str]:
    """--mesh "fsdp=4,tensor=2" -> mesh.data=1 mesh.fsdp=4 mesh.tensor=2 (+ mesh.rules=fsdp_tp with tensor > 1
    unless `overrides` set mesh.rules)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for item in filter(None, spec.split(",")):
        axis, sep, size = item.partition("=")
        if not sep or axis not in sizes or not size.lstrip("-").isdigit():
            raise SystemExit(f"error: --mesh expects AXIS=N,... with AXIS in {', '.join(MESH_AXES)}, got {item!r}")
        sizes[axis] = int(size)
    out = [f"mesh.{axis}={size}" for axis, size in sizes.items()]
    if sizes["tensor"] > 1 and not any(o.startswith("mesh.rules=") for o in overrides):
        out.append("mesh.rules=fsdp_tp")
    return out


def aot_plan(exp: str, config, setting: str, say) -> None:
    """One --aot-only row: the step compiled from abstract shapes, XLA's per-device memory plan."""
    import jax

    from medjax.bench.memory import plan_step

    plan = plan_step(config)
    memory, mib = plan.memory, (lambda n: f"{n / 2**20:,.1f}")
    params = f"{plan.params / 1e9:.2f}B" if plan.params >= 1e9 else f"{plan.params / 1e6:.2f}M"
    mesh = " ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    if memory is None:
        cells = ["n/a"] * 5
    else:
        cells = [mib(memory.argument_bytes), mib(memory.output_bytes), mib(memory.temp_bytes),
                 mib(memory.argument_bytes + memory.temp_bytes), mib(memory.peak_bytes)]
    say(f"| {exp} | {config.variant} | {setting} | {mesh} ({jax.device_count()} x {jax.devices()[0].device_kind}) | "
        f"{params} | {config.train.batch_size} | {config.dtype} | {plan.seconds:.1f} | "
        + " | ".join(cells) + " |", flush=True)


def fits(exp: str, config, device, say) -> bool:
    """Whether one device's params + optimizer state (abstract shapes, `memory.state_bytes_per_device`) fit the
    memory it has; if not, says so instead of allocating (a paper-size step on a small host) and points to the
    plan that --aot-only prints."""
    from medjax.bench.memory import available_bytes_per_device, state_bytes_per_device

    available = available_bytes_per_device(device)
    if available is None:
        return True
    params, need = state_bytes_per_device(config)
    if need <= available:
        return True
    say(f"{exp} ({config.variant}, batch {config.train.batch_size}): not run -- {params / 1e9:.2f}B params; one "
        f"device's params + optimizer state alone need {need / 2**30:.1f} GiB (activations come on top), "
        f"{available / 2**30:.1f} GiB is available on {device.device_kind}. Its per-device plan without allocating: "
        f"python -m medjax.bench step --exp {exp} --variant {config.variant} --aot-only [--mesh fsdp=8] "
        "(with XLA_FLAGS=--xla_force_host_platform_device_count=8 for an 8-device mesh on one host)", flush=True)
    return False


def work_unit(task) -> tuple[str, int] | None:
    """What one example is worth, from the task's `work_per_example()`: ("tokens", n), ("voxels", n) or ("pixels", n)
    (`measure` replaces n by the mean over its timed batches of `task.work_in_batch`)."""
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
    p.add_argument("--aot-only", action="store_true",
                   help="compile from abstract shapes and print the per-device memory plan; allocate and run nothing")
    p.add_argument("--mesh", default="", metavar="AXIS=N,...",
                   help="the mesh, e.g. fsdp=8 or fsdp=4,tensor=2 (mesh.data/fsdp/tensor; tensor > 1: rules fsdp_tp)")
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
    if args.mesh:
        overrides = mesh_overrides(args.mesh, overrides) + overrides
    device = jax.devices()[0]
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)  # only process 0 reports
    if args.aot_only:
        from medjax.bench.memory import config_with_placeholders

        say("| exp | variant | settings | mesh (devices) | params | batch | dtype | compile s | argument MiB/device "
            "| output MiB/device | temp MiB/device | argument+temp MiB/device | planned peak MiB/device |")
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as directory:
            for setting in settings_to_compare(args.compare):
                config = config_with_placeholders(args.exp, args.variant, overrides + setting, directory)
                aot_plan(args.exp, config, " ".join(setting) or "-", say)
        say("(XLA's plan for one device's program: arguments = its shard of params + optimizer state + batch; "
            "peak = the compiler's, or arguments + outputs + temporaries - donated aliases where it reports none)")
        return
    say("| exp | variant | settings | devices | params | batch | compile s | step s | steps/s | examples/s "
          "| tokens or voxels/s | GFLOP/step/device | MFU | arg+temp MiB | peak RSS MiB |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    memories = []
    placeholders = tempfile.TemporaryDirectory()
    for setting in settings_to_compare(args.compare):
        if args.synthetic:
            from medjax.bench.memory import config_with_placeholders

            config = config_with_placeholders(args.exp, args.variant, overrides + setting, placeholders.name)
        else:
            config = config_lib.get_config(args.exp, args.variant, overrides + setting)
        if not fits(args.exp, config, device, say):
            continue
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
