"""kill -9 at three points of a toy run (tests/toy_task.py, in a subprocess): during a step, during the
background write of a checkpoint (its files written, not yet committed) and right after a save has finished.
Each rerun on the same workdir takes over the stale lock, resumes from the newest complete checkpoint and
ends bitwise where an uninterrupted run does (params, and the losses of every step: the same data order)."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax.checkpoint import restore_params
from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POINTS = ("during_step", "during_checkpoint_write", "after_save")


def _config():
    config = toy_config(steps=6, checkpoint_every=2)
    config.mesh.num_devices = 1
    return config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    Trainer(_config(), ToyTask(_config()), str(workdir)).run()
    return restore_params(str(workdir)), _losses(workdir)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_then_resume_is_exact(tmp_path, uninterrupted, point):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, "-m", "tests.reliability.test_kill_resume", str(tmp_path), point],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "KILLING" in killed.stdout
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    if point == "during_checkpoint_write":
        assert "4" not in checkpoints and any(".orbax-checkpoint-tmp" in c for c in checkpoints), checkpoints
    if point == "after_save":
        assert "4" in checkpoints
    with pytest.warns(UserWarning, match="taking over a stale lock"):
        result = Trainer(_config(), ToyTask(_config()), str(tmp_path)).run()
    assert result["step"] == 6
    params, losses = uninterrupted
    for x, y in zip(jax.tree.leaves(restore_params(str(tmp_path))), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert _losses(tmp_path) == losses  # each step once, with the uninterrupted run's loss


def _kill(reason):
    print(f"KILLING {reason}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_run(workdir: str, point: str) -> None:
    """`python -m tests.reliability.test_kill_resume WORKDIR POINT`: the toy run, killed with SIGKILL at POINT."""
    import medjax.trainer as trainer_lib
    from medjax import metric_writer

    if point == "during_step":  # the batch of step 5 fetched, its update not yet applied
        global_batch, calls = trainer_lib.global_batch, []

        def batch_then_kill(*args):
            calls.append(1)
            if len(calls) == 5:
                _kill("during step 5")
            return global_batch(*args)

        trainer_lib.global_batch = batch_then_kill
    elif point == "during_checkpoint_write":  # Orbax's commit rename of step 4, in its background thread
        rename = os.rename

        def rename_then_kill(src, dst, *args, **kwargs):
            if ".orbax-checkpoint-tmp" in os.fspath(src) and os.fspath(dst).rstrip("/").endswith("checkpoints/4"):
                _kill("before committing checkpoint 4")
            return rename(src, dst, *args, **kwargs)

        os.rename = rename_then_kill
    else:  # right after step 4's save has finished and its checksums are recorded
        log = metric_writer.MetricWriter.log

        def log_then_kill(self, message):
            log(self, message)
            if message.startswith("checkpoint: step 4 saved"):
                _kill("after checkpoint 4 was saved")

        metric_writer.MetricWriter.log = log_then_kill
    trainer_lib.Trainer(_config(), ToyTask(_config()), workdir).run()
    print("NOT KILLED", flush=True)


if __name__ == "__main__":
    import importlib

    importlib.import_module("tests.conftest")  # the same XLA flags and compilation cache as the test process

    _killed_run(sys.argv[1], sys.argv[2])
