"""MRM end to end through the CLIs: every experiment's tiny variant, 8-device sharding, SIGTERM
resume, pretraining -> APTOS fine-tuning -> evaluation tables."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from medjax import config as config_lib
from medjax.tasks import build_task
from medjax.trainer import Trainer

QUIET = dict(log=lambda *_: None)


def tiny_config(exp, data, *overrides):
    sub = "aptos" if exp == "mrm_aptos" else ""
    return config_lib.get_config(exp, "tiny", [f"data.dir={os.path.join(data, sub)}", *overrides])


@pytest.mark.parametrize("exp", config_lib.available_experiments())
def test_every_experiment_tiny_runs_a_step(exp, fundus_demo, tmp_path):
    config = tiny_config(exp, fundus_demo, "train.steps=1")
    result = Trainer(config, build_task(config, **QUIET), str(tmp_path)).run()
    assert result["step"] == 1 and np.isfinite(result["losses"][0])


def test_mrm_on_8_devices_equals_1_device(fundus_demo, tmp_path):
    losses = {}
    for name, mesh in {"one": ["mesh.num_devices=1"], "eight": ["mesh.data=4", "mesh.fsdp=2"]}.items():
        config = tiny_config("mrm_retina", fundus_demo, "train.steps=3", *mesh)
        trainer = Trainer(config, build_task(config, **QUIET), str(tmp_path / name))
        losses[name] = trainer.run()["losses"]
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-4)
    assert losses["one"][-1] != losses["one"][0]


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
    resumed = subprocess.run(cmd[:-6] + ["--set", f"train.steps={saved[-1] + 1}", "--set", "train.log_every=1"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from" in resumed.stdout and f"at step {saved[-1]}" in resumed.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-1] == saved[-1] + 1


def test_pretrain_finetune_evaluate(fundus_demo, tmp_path):
    from medjax import evaluate, train

    pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
    assert train.main(["--exp", "mrm_retina", "--variant", "tiny", "--data", fundus_demo, "--workdir", pre,
                       "--set", "train.steps=2"]) == 0
    assert train.main(["--exp", "mrm_aptos", "--variant", "tiny", "--data", os.path.join(fundus_demo, "aptos"),
                       "--workdir", fine, "--set", f"init={pre}", "--set", "train.steps=2",
                       "--set", "data.label_fraction=0.5"]) == 0
    assert evaluate.main(["--exp", "mrm_aptos", "--checkpoint", fine]) == 0
    table = open(os.path.join(fine, "results.md")).read()
    assert "| Method | 50% auc | 50% kappa | 50% accuracy |" in table
    results = json.load(open(os.path.join(fine, "results.json")))[0]
    assert 0.0 <= results["auc"] <= 1.0 and -1.0 <= results["kappa"] <= 1.0 and results["examples"] > 0
