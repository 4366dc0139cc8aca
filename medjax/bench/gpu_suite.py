"""python -m medjax.bench gpu-suite [--out DIR] [--budget S] [--only NAME ...] [--with-monai] [--dry-run]

The benchmarks that prove the GPU paths, in one run of at most `--budget` seconds (default 450: under the
8 minutes a lent device session allows, compile times included). Every item is a `python -m medjax.bench`
command run in a child process with its own time cap (killed when it runs over; the suite goes on), and
the suite writes DIR/gpu_suite.json (per item: command, cap, seconds, status, its output) and
DIR/gpu_suite.md (a status table, then each item's markdown tables). Items (`ITEMS`):

  relation_mask    MRM's Pallas relation-masking attention vs the dense reference, N = 1024, 4096, 16384
                   (time and compiled peak; target >= 2x faster and O(N) memory from N = 4096)
  dynamic_head     the Universal Model's dynamic-head kernel vs the unfused reference at 96^3 and 128^3
                   (target: peak memory <= 1/8 of the reference's)
  uni_step         UNI's DINOv2 ViT-L/16 train step in bf16 (full multi-crop recipe, synthetic batch): MFU
  llama_block      a Llama-7B-shaped decoder block (+ embedding and LM head) train step in bf16: MFU
  universal_step   the Universal Model's Swin UNETR train step at 96^3, batch 2 (paper's fp32): step time
  sliding_window   Universal Model inference on a 512 x 512 x 300 volume (96^3 windows, overlap 0.5);
                   vs MONAI only with --with-monai (MONAI then runs on torch's device: install a CUDA build
                   of torch on the GPU host first, e.g. `pip install torch --index-url
                   https://download.pytorch.org/whl/cu126`, or a wheel copied there beforehand when the
                   host has no network; the CPU torch of the test extra would time the host's CPU instead)

`--dry-run` checks every item's command line against its benchmark's own parser and writes the plan
(status "planned") without running anything: it works on any machine and is what the tests run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import subprocess
import sys
import time

_WHERE = "medjax/bench/gpu_suite.py"


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark of the suite: `python -m medjax.bench <bench> <args>` with a time cap in seconds."""

    name: str
    bench: str
    args: tuple[str, ...]
    cap_s: int
    what: str

    def command(self) -> list[str]:
        return [sys.executable, "-m", "medjax.bench", self.bench, *self.args]


ITEMS: tuple[Item, ...] = (
    Item("relation_mask", "relation_mask",
         ("--tokens", "1024", "4096", "16384", "--ratios", "0.5", "--iters", "5", "--warmup", "1"), 75,
         "MRM relation-mask kernel vs dense reference (time, peak)"),
    Item("dynamic_head", "dynamic_conv3d", ("--sizes", "96", "128", "--classes", "32", "--batch", "2",
                                            "--iters", "5", "--warmup", "1"), 45,
         "Universal dynamic-head kernel vs unfused reference (time, peak)"),
    Item("uni_step", "step", ("--exp", "uni_vitl16", "--variant", "full", "--synthetic", "--batch-size", "32",
                              "--steps", "3", "--set", "dtype=bfloat16"), 120,
         "UNI DINOv2 ViT-L/16 train step, bf16 (MFU)"),
    Item("llama_block", "llama_step", ("--depth", "1", "--batch", "4", "--seq", "2048", "--dtype", "bfloat16",
                                       "--steps", "5"), 60,
         "Llama-7B-shaped decoder block train step, bf16 (MFU)"),
    Item("universal_step", "step", ("--exp", "universal_swin", "--variant", "full", "--synthetic",
                                    "--batch-size", "2", "--steps", "3"), 100,
         "Universal Model Swin UNETR train step, 96^3, batch 2"),
    Item("sliding_window", "sliding_window", ("--size", "512", "512", "300", "--batch-size", "4", "--iters", "1",
                                              "--warmup", "0", "--impl", "medjax"), 80,
         "Universal sliding-window inference, 512x512x300"),
)
BENCH_MODULES = {"relation_mask": "medjax.bench.relation_mask", "dynamic_conv3d": "medjax.bench.dynamic_conv3d",
                 "step": "medjax.bench.step", "llama_step": "medjax.bench.llama_step",
                 "sliding_window": "medjax.bench.sliding_window", "vs_torch": "medjax.bench.vs_torch"}


def with_monai(items: tuple[Item, ...]) -> tuple[Item, ...]:
    """The items with the sliding-window one timing MONAI as well (`--impl both`)."""
    def swap(item):
        if item.name != "sliding_window":
            return item
        args = list(item.args)
        args[args.index("--impl") + 1] = "both"
        return dataclasses.replace(item, args=tuple(args))

    return tuple(swap(item) for item in items)


def check_item(item: Item) -> None:
    """Parse the item's arguments with its benchmark's own parser (SystemExit / ValueError naming the item)."""
    if item.bench not in BENCH_MODULES:
        raise ValueError(f"{_WHERE}: item {item.name!r}: unknown benchmark {item.bench!r}")
    parser = importlib.import_module(BENCH_MODULES[item.bench])._parser()
    try:
        parser.parse_args(list(item.args))
    except SystemExit as error:
        raise ValueError(f"{_WHERE}: item {item.name!r}: {item.bench} rejects {' '.join(item.args)}") from error


def run_item(item: Item, cap_s: float, command: list[str] | None = None) -> dict:
    """Run one item in a child process for at most `cap_s` seconds: its record (status ok / failed / timeout)."""
    command = command or item.command()
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=cap_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as error:
        status = f"timeout ({cap_s:.0f} s)"
        stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        stderr = error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
    return {"name": item.name, "what": item.what, "command": " ".join(command[1:]), "cap_s": cap_s,
            "seconds": round(time.perf_counter() - start, 1), "status": status, "stdout": stdout[-20000:],
            "stderr_tail": stderr[-3000:] if status != "ok" else ""}


def markdown(report: dict) -> str:
    lines = [f"# medjax GPU suite: {report['device']}, {report['started']}", "",
             "| item | what | status | seconds | cap s |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['what']} | {r['status']} | {r['seconds']} | {r['cap_s']:.0f} |"
              for r in report["items"]]
    for r in report["items"]:
        tables = [line for line in r.get("stdout", "").splitlines() if line.startswith("|") or ":" in line[:40]]
        if tables:
            lines += ["", f"## {r['name']}", "", f"`python -m {r['command'].split(' -m ', 1)[-1]}`", "", *tables]
    return "\n".join(lines) + "\n"


def _device() -> str:
    try:
        import jax

        d = jax.devices()[0]
        return f"{jax.device_count()} x {d.device_kind} ({d.platform})"
    except Exception as error:  # noqa: BLE001 - reported, not raised: the plan is still written
        return f"unknown ({error})"


def run_suite(items: tuple[Item, ...], out: str, budget_s: float, dry_run: bool) -> dict:
    os.makedirs(out, exist_ok=True)
    report = {"device": "dry run (nothing timed)" if dry_run else _device(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "budget_s": budget_s, "items": []}
    deadline = time.perf_counter() + budget_s
    for item in items:
        check_item(item)
        left = deadline - time.perf_counter()
        if dry_run:
            record = {"name": item.name, "what": item.what, "command": " ".join(item.command()[1:]),
                      "cap_s": item.cap_s, "seconds": 0.0, "status": "planned"}
        elif left < 10:
            record = {"name": item.name, "what": item.what, "command": " ".join(item.command()[1:]),
                      "cap_s": item.cap_s, "seconds": 0.0, "status": "skipped (suite budget spent)"}
        else:
            record = run_item(item, min(item.cap_s, left))
        report["items"].append(record)
        print(f"gpu-suite: {item.name}: {record['status']} ({record['seconds']} s)", flush=True)
        with open(os.path.join(out, "gpu_suite.json"), "w") as f:  # after every item: a kill keeps the rest
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "gpu_suite.md"), "w") as f:
            f.write(markdown(report))
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench gpu-suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="directory for the JSON and markdown "
                   "(default $OUT, else bench_out)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite")
    p.add_argument("--only", nargs="+", default=None, choices=[item.name for item in ITEMS])
    p.add_argument("--with-monai", action="store_true", help="time MONAI in the sliding-window item too")
    p.add_argument("--dry-run", action="store_true", help="check and plan every item, run none")
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    items = with_monai(ITEMS) if args.with_monai else ITEMS
    if args.only:
        items = tuple(item for item in items if item.name in args.only)
    report = run_suite(items, args.out, args.budget, args.dry_run)
    print(f"gpu-suite: wrote {os.path.join(args.out, 'gpu_suite.json')} and gpu_suite.md "
          f"({sum(r['status'] == 'ok' for r in report['items'])}/{len(report['items'])} ok)")
