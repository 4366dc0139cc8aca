"""After a resume metrics.jsonl holds each step once (issue #15: it repeated every step since the restored
checkpoint), and the log says when a checkpoint save starts and when it has finished."""
import json
import os
import shutil

from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _computed(row):
    return {k: v for k, v in row.items() if k not in ("time", "examples_per_sec")}


def test_rows_past_the_restored_step_are_dropped_and_saves_are_logged(tmp_path, capsys):
    config = toy_config(steps=6, checkpoint_every=2)
    config.mesh.num_devices = 1
    Trainer(config, ToyTask(config), str(tmp_path / "full")).run()
    out = capsys.readouterr().out
    for step in (2, 4, 6):
        assert f"checkpoint: saving step {step} to {tmp_path}/full/checkpoints/{step}" in out
        assert f"checkpoint: step {step} saved (" in out and "checksums recorded)" in out
    full = _rows(tmp_path / "full")
    # As after a crash at step 6 whose last checkpoint is step 4: rows 5 and 6 were logged, not saved.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')  # a row cut by the crash
    Trainer(config, ToyTask(config), str(tmp_path / "resumed")).run()
    assert "dropped 3 metrics rows past step 4" in capsys.readouterr().out
    resumed = _rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [_computed(r) for r in resumed] == [_computed(r) for r in full]
