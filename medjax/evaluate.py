"""python -m medjax.evaluate --exp NAME --checkpoint DIR [DIR ...] [--variant V] [--data DIR] [--set k=v]

Loads each checkpoint's params, runs the task's evaluation and prints the metrics as a markdown
table laid out like the paper's (one column group per checkpoint, labelled by the task's `column_label`),
writing CSV and JSON beside it.
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
    p.add_argument("--out", default=None, help="where to write results.{md,csv,json}; default: the first checkpoint dir")
    return p


def saved_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from medjax import checkpoint as checkpoint_lib
    from medjax import config as config_lib
    from medjax.tasks import build_task

    columns = []
    for path in args.checkpoint:
        saved = saved_config(path)
        variant = args.variant or saved.get("variant")
        overrides = list(args.overrides) + ([f"data.dir={args.data}"] if args.data else [])
        if not args.data and saved.get("data", {}).get("dir"):
            overrides.append(f"data.dir={saved['data']['dir']}")
        config = config_lib.get_config(args.exp, variant, overrides)  # a ConfigError: one line, exit 2 (medjax.cli)
        task = build_task(config)
        params = checkpoint_lib.restore_params(path)
        results = task.evaluate(params)
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
