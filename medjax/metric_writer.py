"""Per-step metrics to stdout (a progress bar on a TTY, plain lines otherwise), `metrics.jsonl`
and TensorBoard event files in the workdir. Only process 0 writes.

A resumed run first drops what the previous run logged past the restored step (`resume_from`), so that
`metrics.jsonl` and TensorBoard hold each step once (issue #15)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, *, stream=None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.workdir, self.tensorboard = workdir, tensorboard
        self._jsonl = None
        self._tb = None
        self._purge_step = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self._jsonl_path, "a", buffering=1)

    def resume_from(self, step: int) -> int:
        """Drop the `metrics.jsonl` rows past `step` (the restored checkpoint) and have TensorBoard discard
        its events past it (tensorboardX `purge_step`); returns the number of rows dropped."""
        if not self.active:
            return 0
        self._jsonl.close()
        with open(self._jsonl_path) as f:
            lines = f.readlines()
        # A line that is no complete record was cut by a killed run: dropped too (appending would extend it).
        kept = [line for line in lines if line.endswith("\n") and (_row_step(line) or 0) <= step and _row_step(line) is not None]
        if len(kept) != len(lines):
            with open(self._jsonl_path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self._jsonl_path + ".tmp", self._jsonl_path)
            self.log(f"resume: dropped {len(lines) - len(kept)} metrics rows past step {step} from {self._jsonl_path}")
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        self._purge_step = step + 1 if step > 0 else None
        return len(lines) - len(kept)

    def _tensorboard(self):
        if self._tb is None and self.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), purge_step=self._purge_step)
        return self._tb

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for key, value in metrics.items():
                tb.add_scalar(key, float(value), int(step))
        shown = " ".join(f"{k}={_format(float(v))}" for k, v in metrics.items())
        if self.tty:
            width = 30
            done = int(width * step / max(self.total_steps, 1))
            bar = "#" * done + "." * (width - done)
            self.stream.write(f"\r[{bar}] {step}/{self.total_steps} {shown}\033[K")
            self.stream.flush()
        else:
            self.stream.write(f"step {step}/{self.total_steps} {shown}\n")
            self.stream.flush()

    def log(self, message: str) -> None:
        if self.active:
            prefix = "\n" if self.tty else ""
            self.stream.write(prefix + message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self.active and self.tty:
            self.stream.write("\n")
