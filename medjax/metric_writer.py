"""Per-step metrics to stdout (a progress bar on a TTY, plain lines otherwise), `metrics.jsonl`
and TensorBoard event files in the workdir. Only process 0 writes."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, *, stream=None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), int(step))
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
