"""python -m medjax.train --exp NAME [--variant V] [--data DIR] [--workdir DIR] [--set key=value ...]

CLI -> config -> Task -> Trainer.run(). An existing workdir with a checkpoint resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from medjax.cli import entry_point, report_input_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment name: a file in experiments/ (e.g. mrm_retina)")
    p.add_argument("--variant", default=None,
                   help="config variant (e.g. full, demo, tiny); default: the paper's setup, or the "
                        "experiment's demo variant when no --data is given")
    p.add_argument("--data", default=None, help="dataset directory (sets data.dir); default: the embedded demo")
    p.add_argument("--workdir", default=None, help="checkpoints, metrics.jsonl, TensorBoard; default runs/<exp>-<variant>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, typed (repeatable), e.g. --set optim.lr=3e-4")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's id")
    return p


def resolve_variant(exp: str, variant: str | None, data: str | None) -> str | None:
    """No --variant and no --data: the demo variant its task declares (TaskBase.demo_variant)."""
    if variant is None and data is None:
        from medjax import config as config_lib
        from medjax.tasks import task_class

        return task_class(config_lib.get_config(exp).task).demo_variant
    return variant


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from medjax.parallel import multihost

    try:
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:  # an incomplete or malformed process layout
        print(f"error: {err}", file=sys.stderr)
        return 2
    with multihost.exit_on_failure():  # input errors: one line and exit 2 on every process (medjax.cli)
        return report_input_errors(_run, args)


def _run(args) -> int:
    import jax

    from medjax import config as config_lib
    from medjax.tasks import build_task
    from medjax.tasks.base import RunSettings
    from medjax.checkpoint import CheckpointError, finished_step
    from medjax.disk_full import DiskFullError
    from medjax.trainer import NonFiniteLossError, Trainer
    from medjax.workdir_lock import WorkdirLockedError

    say = print if jax.process_index() == 0 else (lambda *_, **__: None)  # only process 0 logs
    variant = resolve_variant(args.exp, args.variant, args.data)
    if variant is not None and args.variant is None:
        say(f"no --data given: training the `{variant}` variant of {args.exp} on demo data "
            f"(pass --data DIR for the paper's setup on your data)")
    overrides = list(args.overrides) + ([f"data.dir={args.data}"] if args.data else [])
    config = config_lib.get_config(args.exp, variant, overrides)  # a ConfigError: one line, exit 2 (medjax.cli)
    workdir = args.workdir or os.path.join("runs", f"{args.exp}-{config.variant}")
    say(f"workdir: {os.path.abspath(workdir)}")
    done = finished_step(workdir, config) if jax.process_count() == 1 else None
    if done is not None:  # a rerun of a finished run: no data check, no compile, no new event file
        say(f"nothing to do: {workdir} holds a verified checkpoint at step {done} (train.steps="
            f"{config.train.steps}); pass a larger --set train.steps=N to continue training")
        return 0
    task = build_task(config, log=say, run=RunSettings.from_config(config, workdir=workdir))  # caches the data check
    trainer = Trainer(config, task, workdir)
    start = time.time()
    try:
        result = trainer.run()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (WorkdirLockedError, DiskFullError, CheckpointError) as err:  # one line each (issue #15)
        print(f"error: {err}", file=sys.stderr)
        return 4
    say(f"done: step {result['step']} in {time.time() - start:.0f}s" +
        (" (stopped by SIGTERM; rerun with the same --workdir to resume)" if result.get("preempted") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
