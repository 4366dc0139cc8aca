"""The best-validation checkpoint (medjax.best_checkpoint) on the toy task: kept at the best validation value,
strictly better only, the task's declared metric as default, resume-safe, read by evaluate, config errors."""
import json
import os

import jax
import numpy as np
import pytest

from medjax import best_checkpoint as best_lib
from medjax.checkpoint import restore_params
from medjax.config import ConfigError
from medjax.evaluate import checkpoint_to_evaluate
from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config


class SelectingToyTask(ToyTask):
    """Declares its selection metric (validation mse, lower is better), as a fine-tuning task does."""

    def selection_metric(self):
        return ("mse", "min")


class ScriptedToyTask(ToyTask):
    """validate() returns the next value of `script` as `score`, whatever the params."""

    script = (1.0, 2.0, 2.0, 0.5)

    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.calls = 0

    def validate(self, params):
        self.calls += 1
        return {"score": self.script[self.calls - 1]}


def run(workdir, task_class=SelectingToyTask, **train):
    config = toy_config(**dict(dict(eval_every=1, checkpoint_every=2), **train))
    config.mesh.num_devices = 1
    task = task_class(config)
    return Trainer(config, task, str(workdir)).run(), config, task


def validation_rows(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_best_is_the_minimum_of_the_declared_metric(tmp_path):
    _, _, task = run(tmp_path, steps=6)
    logged = validation_rows(tmp_path, "val/mse")
    assert sorted(logged) == list(range(1, 7))
    best = best_lib.best_dir(str(tmp_path))
    record = best_lib.read_best(best)
    step = min(logged, key=logged.get)
    assert record == {"metric": "mse", "mode": "min", "value": logged[step], "step": step}
    params = restore_params(best)  # the evaluate/init reader takes the best directory as it is
    assert task.evaluate(params)["mse"] == pytest.approx(logged[step], rel=1e-6)
    assert checkpoint_to_evaluate(str(tmp_path), log=lambda *_: None) == best
    assert checkpoint_to_evaluate(str(tmp_path), latest=True) == str(tmp_path)


def test_strictly_better_only_and_max_mode(tmp_path):
    _, _, task = run(tmp_path, ScriptedToyTask, steps=4, select_metric="val/score", select_mode="max")
    assert task.calls == 4
    record = best_lib.read_best(best_lib.best_dir(str(tmp_path)))
    assert (record["value"], record["step"], record["mode"]) == (2.0, 2, "max")  # the tie at step 3 keeps step 2


def test_restart_keeps_the_best_value(tmp_path):
    run(tmp_path / "full", steps=6)
    first, _, _ = run(tmp_path / "split", steps=6, stop_at=3)
    assert first["step"] == 3
    run(tmp_path / "split", steps=6)
    full = best_lib.read_best(best_lib.best_dir(str(tmp_path / "full")))
    split = best_lib.read_best(best_lib.best_dir(str(tmp_path / "split")))
    assert full == split
    a, b = restore_params(str(tmp_path / "full" / "best")), restore_params(str(tmp_path / "split" / "best"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # a new keeper over the workdir starts from the saved value: only a strictly better one replaces it
    keeper = best_lib.BestCheckpoint(str(tmp_path / "split"), "mse", "min")
    assert (keeper.value, keeper.step) == (split["value"], split["step"])
    assert not keeper.improves(split["value"]) and keeper.improves(split["value"] / 2)


def test_interrupted_swap_is_put_back(tmp_path):
    run(tmp_path, steps=1)
    best = str(tmp_path / "best")
    os.rename(best, best + ".old")  # a crash between the two renames of a swap
    os.makedirs(best + ".tmp")
    keeper = best_lib.BestCheckpoint(str(tmp_path), "mse", "min")
    assert keeper.step is not None and os.path.isdir(best) and not os.path.exists(best + ".tmp")


def test_no_validation_no_best(tmp_path):
    run(tmp_path, steps=1, eval_every=0)  # the task declares a metric, but nothing validates
    assert best_lib.best_dir(str(tmp_path)) is None


@pytest.mark.parametrize("train, message", [
    (dict(select_metric="mse", eval_every=0), "needs train.eval_every >= 1"),
    (dict(select_metric="mse", select_mode="median"), "select_mode='median'"),
])
def test_config_errors(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, **train)


def test_unknown_metric_names_the_validation_metrics(tmp_path):
    with pytest.raises(ConfigError, match=r"select_metric='auc'.*\['mse'\]"):
        run(tmp_path, steps=1, select_metric="auc")
