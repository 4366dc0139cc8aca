"""MRM end to end through the CLIs: every experiment's tiny variant, SIGTERM resume,
pretraining -> APTOS fine-tuning -> evaluation tables. (Sharded runs vs one device: the trainer in
tests/test_trainer.py, every model under every preset in tests/parallel/test_presets.py.)"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.checkpoint import restore_params
from medjax.tasks import build_task
from medjax.trainer import Trainer
from tests.experiment_data import tiny_data_overrides

QUIET = dict(log=lambda *_: None)


SINGLE_DEVICE = ["mesh.num_devices=1", "train.steps=2"]  # the same step as the CLI runs below: compiled once


def tiny_config(exp, data, *overrides):
    sub = "aptos" if exp == "mrm_aptos" else ""
    return config_lib.get_config(exp, "tiny", [f"data.dir={os.path.join(data, sub)}", *SINGLE_DEVICE, *overrides])


@pytest.mark.parametrize("exp", config_lib.available_experiments())
def test_every_experiment_tiny_feeds_its_model(exp, demo_roots, tmp_path):
    """Every experiment's tiny variant builds its task on a demo of its data kind, and the pipeline's
    batches have exactly the keys, per-example shapes and dtypes the model was initialised with."""
    base = config_lib.get_config(exp, "tiny")
    config = config_lib.get_config(exp, "tiny", [*tiny_data_overrides(base, demo_roots, str(tmp_path)), *SINGLE_DEVICE])
    task = build_task(config, **QUIET)
    batch, init = next(iter(task.train_data())), task.init_batch()
    assert sorted(batch) == sorted(init), exp
    for key in init:
        # the global batch, or one kind's share of it where a batch mixes kinds (UniMedI: 2D + 3D)
        assert np.shape(batch[key])[0] == np.shape(init[key])[0] <= int(config.train.batch_size), (exp, key)
        assert np.shape(batch[key])[1:] == np.shape(init[key])[1:], (exp, key)
        assert np.asarray(batch[key]).dtype == np.asarray(init[key]).dtype, (exp, key)


@pytest.mark.parametrize("exp", ["mrm_retina", "mrm_aptos"])
def test_mrm_experiments_tiny_run_a_step(exp, fundus_demo, tmp_path):
    """(The other families' tiny training runs: tests/test_train_{universal,uni,ptunifier}.py.)"""
    config = tiny_config(exp, fundus_demo)
    result = Trainer(config, build_task(config, **QUIET), str(tmp_path)).run()
    assert result["step"] == 2 and np.isfinite(result["losses"]).all()


def test_sigterm_saves_and_resumes(fundus_demo, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "-m", "medjax.train", "--exp", "mrm_retina", "--variant", "tiny",
           "--data", fundus_demo, "--workdir", workdir, "--set", "train.steps=100000",
           "--set", "train.checkpoint_every=100000", "--set", "train.log_every=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "SIGTERM: saving a checkpoint" in output
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] >= 3
    # Same config (so the persistent compilation cache serves the step), stopping one step later.
    resumed = subprocess.run(cmd + ["--set", f"train.stop_at={saved[-1] + 1}"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from" in resumed.stdout and f"at step {saved[-1]}" in resumed.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-1] == saved[-1] + 1


def test_pretrain_finetune_evaluate(fundus_demo, tmp_path):
    from medjax import evaluate, train

    pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
    single = [a for o in SINGLE_DEVICE for a in ("--set", o)]
    assert train.main(["--exp", "mrm_retina", "--variant", "tiny", "--data", fundus_demo, "--workdir", pre, *single]) == 0
    assert train.main(["--exp", "mrm_aptos", "--variant", "tiny", "--data", os.path.join(fundus_demo, "aptos"),
                       "--workdir", fine, "--set", f"init={pre}", "--set", "data.label_fraction=0.5", *single]) == 0
    # init= copies the pretrained image encoder into the classifier (checked before any update).
    config = tiny_config("mrm_aptos", fundus_demo, f"init={pre}")
    trainer = Trainer(config, build_task(config, **QUIET), str(tmp_path / "fresh"))
    assert trainer.restore_or_init(None).startswith("initialised from")
    pretrained = restore_params(pre)["image_encoder"]
    loaded = jax.device_get(trainer.state["params"]["encoder"])
    for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    trainer.checkpointer.close()
    assert evaluate.main(["--exp", "mrm_aptos", "--checkpoint", fine]) == 0
    table = open(os.path.join(fine, "results.md")).read()
    assert "| Method | 50% auc | 50% kappa | 50% accuracy |" in table
    results = json.load(open(os.path.join(fine, "results.json")))[0]
    assert 0.0 <= results["auc"] <= 1.0 and -1.0 <= results["kappa"] <= 1.0 and results["examples"] > 0
