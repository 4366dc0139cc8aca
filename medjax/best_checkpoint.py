"""The best-validation checkpoint: `<workdir>/best/` holds the params of the step whose validation metric
(`train.select_metric`, or the task's declared `selection_metric()`) was best so far, in the layout of
`medjax.checkpoint.save_params` (`best/state` = {"params": ...}, a provenance record, checksums), plus
`medjax_best.json` = {"metric", "mode", "value", "step"} (issue #20: the original fine-tuning scripts keep
the checkpoint of the best validation value, e.g. Lightning's `ModelCheckpoint(monitor=..., save_top_k=1)`,
and test on it).

The trainer evaluates `task.validate(params)` every `train.eval_every` steps (and at a run's last step) and
calls `BestCheckpoint.update`; `python -m medjax.evaluate --checkpoint WORKDIR` then reads `best/` when it
exists (`--latest` reads the newest training checkpoint instead). Resume-safe: the best value is read back
from `medjax_best.json`, so a restarted run replaces `best/` only by a strictly better value. A new best is
written beside the old one (`best.tmp`) and swapped in by two renames; a crash between them leaves
`best.old`, which is put back on the next start.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from medjax import checkpoint_integrity as integrity
from medjax import provenance as provenance_lib
from medjax.config import ConfigError

BEST = "best"
RECORD = "medjax_best.json"
MODES = ("max", "min")
VALIDATION_PREFIX = "val/"  # how the trainer logs `task.validate` metrics (metrics.jsonl, TensorBoard)


def best_dir(workdir: str) -> str | None:
    """`<workdir>/best` when it holds a best-validation checkpoint, else None."""
    path = os.path.join(os.path.abspath(workdir), BEST)
    return path if os.path.isdir(os.path.join(path, "state")) and os.path.isfile(os.path.join(path, RECORD)) else None


def read_best(directory: str) -> dict | None:
    """The `medjax_best.json` record of a best directory, or None when there is none."""
    path = os.path.join(directory, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def selection(config, task) -> tuple[str, str] | None:
    """(metric name without "val/", mode) the best checkpoint follows: `train.select_metric` /
    `train.select_mode` when set, else the task's `selection_metric()`; None = no best checkpoint. Refuses a
    mode other than max / min, and a metric named while `train.eval_every` is 0 (nothing would evaluate)."""
    train = config.train
    metric, mode = str(train.get("select_metric", "") or ""), str(train.get("select_mode", "") or "")
    declared = task.selection_metric()
    if metric.startswith(VALIDATION_PREFIX):
        metric = metric[len(VALIDATION_PREFIX):]
    if not metric:
        if declared is None:
            return None
        metric, mode = declared[0], mode or declared[1]
    elif not mode:
        mode = declared[1] if declared is not None and declared[0] == metric else "max"
    if mode not in MODES:
        raise ConfigError(f"config train.select_mode={mode!r}: expected one of {', '.join(MODES)}")
    if int(train.get("eval_every", 0)) < 1:
        if train.get("select_metric", ""):
            raise ConfigError(f"config train.select_metric={train.select_metric!r} needs train.eval_every >= 1 "
                              "(the validation that selects the best checkpoint)")
        return None  # the task's default selection, with validation off: no best checkpoint
    return metric, mode


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class BestCheckpoint:
    """Keeps `<workdir>/best` at the params of the best `metric` value seen (`mode` max or min)."""

    def __init__(self, workdir: str, metric: str, mode: str, *, provenance: dict | None = None,
                 log: Callable[[str], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"medjax/best_checkpoint.py: mode {mode!r}, expected one of {MODES}")
        self.directory = os.path.join(os.path.abspath(workdir), BEST)
        self.metric, self.mode, self.provenance = metric, mode, provenance
        self.log = log or (lambda message: None)
        self.value: float | None = None
        self.step: int | None = None
        if jax.process_index() == 0:
            self._recover()
        _barrier("medjax_best_recover")
        record = read_best(self.directory) if best_dir(os.path.dirname(self.directory)) else None
        if record is None:
            return
        if record.get("metric") == metric and record.get("mode") == mode:
            self.value, self.step = float(record["value"]), int(record["step"])
            self.log(f"best checkpoint: {VALIDATION_PREFIX}{metric}={self.value:.6g} at step {self.step} "
                     f"({self.directory})")
        else:
            self.log(f"best checkpoint: {self.directory} was selected by {record.get('mode')} "
                     f"{VALIDATION_PREFIX}{record.get('metric')}; now {mode} {VALIDATION_PREFIX}{metric}: "
                     "it is replaced at the next validation")

    def _recover(self) -> None:
        """Put back `best.old` when a crash fell between the two renames of a swap; drop a partial `best.tmp`."""
        old, tmp = self.directory + ".old", self.directory + ".tmp"
        if os.path.isdir(old):
            if os.path.isdir(self.directory):
                shutil.rmtree(old)
            else:
                os.rename(old, self.directory)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)

    def improves(self, value: float) -> bool:
        """A finite value strictly better than the best so far (the first finite value always is)."""
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, results: dict[str, float], params: Any) -> bool:
        """Save `params` as the best when `results[metric]` improves on the best so far; True when it did.
        Every process calls this (the save is collective)."""
        if self.metric not in results:
            raise ConfigError(f"config train.select_metric={self.metric!r}: the task's validation returned "
                              f"{sorted(results)}; choose one of them")
        value = float(results[self.metric])
        if not self.improves(value):
            return False
        previous = self.value
        self._save(step, value, params)
        was = "first" if previous is None else f"was {previous:.6g}"
        self.log(f"best checkpoint: {VALIDATION_PREFIX}{self.metric}={value:.6g} at step {step} ({was}) -> "
                 f"{self.directory}")
        return True

    def _save(self, step: int, value: float, params: Any) -> None:
        tmp, old = self.directory + ".tmp", self.directory + ".old"
        if jax.process_index() == 0 and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        _barrier("medjax_best_clear")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "state"), {"params": params})
        checkpointer.wait_until_finished()
        checkpointer.close()
        if jax.process_index() == 0:
            if self.provenance is not None:
                provenance_lib.write_record(tmp, self.provenance)
            with open(os.path.join(tmp, RECORD), "w") as f:
                json.dump({"metric": self.metric, "mode": self.mode, "value": value, "step": int(step)}, f, indent=1)
            integrity.record_checksums(tmp)
            if os.path.isdir(self.directory):
                os.rename(self.directory, old)
            os.rename(tmp, self.directory)
            if os.path.isdir(old):
                shutil.rmtree(old)
        _barrier("medjax_best_swap")
        self.value, self.step = value, int(step)
