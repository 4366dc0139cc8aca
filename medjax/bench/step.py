"""python -m medjax.bench step --exp NAME [--variant V] [--steps N] [--set k=v]

Times one experiment's jitted train step on the current devices: ahead-of-time compile time,
compiled memory (from the compiler), steps/s and examples/s, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medjax.bench step", description=__doc__)
    p.add_argument("--exp", required=True)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--data", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    import jax

    from medjax import config as config_lib
    from medjax.tasks import build_task
    from medjax.trainer import Trainer, describe_memory, global_batch

    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.data:
        overrides.append(f"data.dir={args.data}")
    config = config_lib.get_config(args.exp, args.variant, overrides)
    task = build_task(config, log=lambda *_: None)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, task, workdir)
        iterator = iter(task.train_data())
        batches = [global_batch(next(iterator), trainer.batch_sharding, trainer.process_count)
                   for _ in range(min(args.steps + 1, 4))]
        compiled, compile_s, memory = trainer.compile(batches[0])
        state = trainer.state
        with jax.set_mesh(trainer.mesh):
            state, metrics = compiled(state, batches[0])
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for i in range(args.steps):
                state, metrics = compiled(state, batches[(i + 1) % len(batches)])
            jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - start) / args.steps
        trainer.checkpointer.close()
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    batch = int(config.train.batch_size)
    print(f"| exp | variant | devices | params | batch | compile s | step s | steps/s | examples/s | peak RSS MiB |")
    print(f"|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.exp} | {config.variant} | {jax.device_count()} x {jax.devices()[0].platform} | {params / 1e6:.2f}M | "
          f"{batch} | {compile_s:.1f} | {seconds:.3f} | {1 / seconds:.2f} | {batch / seconds:.1f} | {rss:.0f} |")
    print(describe_memory(memory))
