"""python -m medjax.evaluate --exp NAME --checkpoint DIR [DIR ...] [--latest] [--variant V] [--data DIR] [--set k=v]

Loads each checkpoint's params, runs the task's evaluation and prints the metrics as a markdown
table laid out like the paper's (one column group per checkpoint, labelled by the task's `column_label`),
writing CSV and JSON beside it. A training workdir holding a best-validation checkpoint (`DIR/best`,
medjax.best_checkpoint: `train.eval_every` + `train.select_metric`) is evaluated at it; `--latest` takes the
newest training checkpoint instead.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from medjax.cli import entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment name (e.g. mrm_aptos)")
    p.add_argument("--checkpoint", required=True, nargs="+", help="training workdir(s) or checkpoint dir(s)")
    p.add_argument("--variant", default=None, help="config variant; default: the one saved in the workdir's config.json")
    p.add_argument("--data", default=None, help="dataset directory (sets data.dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--latest", action="store_true",
                   help="evaluate a workdir's newest training checkpoint, not its best-validation one (DIR/best)")
    p.add_argument("--out", default=None, help="where to write results.{md,csv,json}; default: the first checkpoint dir")
    return p


def saved_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def checkpoint_to_evaluate(path: str, latest: bool = False, log=print) -> str:
    """`path/best` (the best-validation checkpoint) when `path` is a workdir that has one and not `latest`,
    else `path` (medjax.checkpoint.params_dir then takes its newest step that verifies)."""
    from medjax import best_checkpoint

    best = None if latest else best_checkpoint.best_dir(path)
    if best is None:
        return path
    record = best_checkpoint.read_best(best)
    log(f"evaluating the best-validation checkpoint {best} ({best_checkpoint.VALIDATION_PREFIX}{record['metric']}="
        f"{record['value']:.6g}, {record['mode']}, step {record['step']}; --latest for the newest checkpoint)")
    return best


def restore_checked(path: str, config, task):
    """The params in `path` (medjax.checkpoint.restore_params) after checking they were written for this
    experiment: a provenance record of another task, or a training run's params whose tree does not fit
    `task`'s model, is refused naming the file and what was expected (medjax.provenance)."""
    import flax.linen as nn
    import jax

    from medjax import checkpoint as checkpoint_lib
    from medjax import provenance

    directory = checkpoint_lib.params_dir(path)
    record = provenance.check_record(directory, config, what="--checkpoint")
    params = checkpoint_lib.restore_params(directory)
    if record is not None and record.get("exp"):  # a training run's params: its tree is its task's init_params
        expected = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
        differences = provenance.tree_differences(params, expected)
        if differences:
            raise provenance.mismatch_error(directory, record, config, ", ".join(differences), what="--checkpoint")
    return directory, record, params


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import flax

    from medjax import checkpoint as checkpoint_lib
    from medjax import config as config_lib
    from medjax import provenance
    from medjax.tasks import build_task
    from medjax.tasks.base import RunSettings

    columns = []
    for path in args.checkpoint:
        saved = saved_config(path)
        overrides = list(args.overrides) + ([f"data.dir={args.data}"] if args.data else [])
        config = config_lib.run_config(args.exp, saved, args.variant, overrides)  # a ConfigError: exit 2 (medjax.cli)
        task = build_task(config, run=RunSettings.from_config(config, results_dir=args.out or path))
        try:
            directory, record, params = restore_checked(checkpoint_to_evaluate(path, args.latest), config, task)
            try:
                results = task.evaluate(params)
            except flax.errors.FlaxError as err:  # converted or unrecorded params that do not fit the model
                raise provenance.mismatch_error(directory, record, config, str(err).splitlines()[0],
                                                what="--checkpoint") from err
        except (provenance.ProvenanceError, checkpoint_lib.CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        columns.append((task.column_label(saved, path), results))
    table = task.results_table(args.exp, columns)
    print(table)
    out = args.out or args.checkpoint[0]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump([{"column": label, **r} for label, r in columns], f, indent=2)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        keys = list(columns[0][1])
        writer.writerow(["column"] + keys)
        for label, r in columns:
            writer.writerow([label] + [r[k] for k in keys])
    print(f"wrote {out}/results.md, results.csv, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
