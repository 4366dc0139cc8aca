"""Every registered task subclasses TaskBase, builds its tiny variant, and exposes the contract the
trainer, evaluate, predict and bench call (methods, never probed with hasattr/getattr)."""
from __future__ import annotations

import ast
import inspect
import os

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.tasks import TASKS, task_class
from medjax.tasks.base import RunSettings, TaskBase
from tests.experiment_data import tiny_data_overrides

REQUIRED = ("init_batch", "init_params", "loss_fn", "train_data", "evaluate")
HOOKS = ("load_pretrained", "initial_params", "post_update", "work_per_example", "results_table", "make_optimizer",
         "optim_config", "column_label")


def _experiment_of(task_name: str) -> str:
    for exp in config_lib.available_experiments():
        if config_lib.get_config(exp, "tiny").task == task_name:
            return exp
    raise AssertionError(f"no experiment uses task {task_name!r}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registered_task_builds_tiny_and_exposes_the_contract(name, demo_roots, tmp_path):
    cls = task_class(name)
    assert issubclass(cls, TaskBase)
    for method in REQUIRED:
        assert getattr(cls, method) is not getattr(TaskBase, method), f"{cls.__name__} lacks {method}"
    assert cls.demo_variant in (None, *("demo",)) or isinstance(cls.demo_variant, str)
    exp = _experiment_of(name)
    base = config_lib.get_config(exp, "tiny")
    config = config_lib.get_config(exp, "tiny", tiny_data_overrides(base, demo_roots, str(tmp_path)))
    run = RunSettings(global_batch=int(config.train.batch_size), eval_batch_size=3, total_steps=7)
    task = cls(config, log=lambda *_: None, run=run)
    assert task.run is run and task.global_batch == run.global_batch
    batch = task.init_batch()
    # batch-major leaves: the global batch, or one kind's share of it where a batch mixes kinds (UniMedI: 2D + 3D)
    assert all(0 < np.shape(v)[0] <= run.global_batch for v in batch.values())
    assert any(np.shape(v)[0] == run.global_batch for v in batch.values()) or name == "unimedi"
    shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    assert jax.tree.leaves(shapes)
    work = task.work_per_example()
    assert work is None or (work[0] > 0 and work[1] in ("tokens", "voxels", "pixels"))
    tx, schedule = task.make_optimizer(run.total_steps)
    assert np.isfinite(float(schedule(run.total_steps // 2)))
    table = task.results_table(exp, [("a", {"auc": 0.5, "loss": 1.0})]) if type(task).results_table is \
        TaskBase.results_table else None
    assert table is None or "| medjax " in table
    for hook in HOOKS:
        assert callable(getattr(task, hook)), f"{cls.__name__}.{hook}"
    checkpoint = os.path.join(str(tmp_path), "run_a") + os.sep
    # the default: the checkpoint folder's name; transfer tables (MRM Tab. 1) prefix the pretraining ("scratch run_a")
    assert task.column_label({}, checkpoint).rpartition(" ")[2] == "run_a"
    if "label_fraction" in config.data:  # label-efficiency tables label columns by the run's fraction
        assert task.column_label({"data": {"label_fraction": 0.1}}, checkpoint).rpartition(" ")[2] == "10%"
        assert task.column_label({"data": {"label_fraction": 1.0}}, checkpoint).rpartition(" ")[2] == "100%"


def test_callers_never_probe_a_task():
    """trainer, evaluate, predict and bench step call methods: no hasattr/getattr on a task."""
    root = os.path.dirname(inspect.getfile(TaskBase))
    files = [os.path.join(root, "..", f) for f in ("trainer.py", "evaluate.py", "train.py")]
    files.append(os.path.join(root, "..", "bench", "step.py"))
    for path in files:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0])
                assert "task" not in target and "module" not in target, f"{path}: {ast.unparse(node)}"


def test_tasks_read_no_run_settings_from_the_config():
    """`config.train.*` and `config.init` reach a task through RunSettings only."""
    root = os.path.dirname(inspect.getfile(TaskBase))
    for name in os.listdir(root):
        if name.endswith(".py") and name != "base.py":
            text = open(os.path.join(root, name)).read()
            assert "config.train" not in text and "config.init" not in text, name


def test_layers_hold_in_the_imports():
    """DESIGN.md's layers: models import no data, losses, convert or tasks; tasks never import the trainer."""
    package = os.path.dirname(os.path.dirname(inspect.getfile(TaskBase)))
    forbidden = {"models": ("medjax.data", "medjax.losses", "medjax.convert", "medjax.tasks", "medjax.trainer"),
                 "tasks": ("medjax.trainer", "medjax.train", "medjax.evaluate")}
    for layer, banned in forbidden.items():
        folder = os.path.join(package, layer)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for module in modules:
                    assert not any(module == b or module.startswith(b + ".") for b in banned), \
                        f"medjax/{layer}/{name} imports {module}"
