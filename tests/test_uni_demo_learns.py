"""The UNI demo learns (issue #23): the tiny variant (the demo's settings at test size: LayerScale 0.1, teacher
momentum 0.95, lr 0.016; experiments/uni_vitl16.py) trained on the WSI demo for 30 steps gives a teacher whose
kNN (k = 20, UNI's ROI metric) balanced accuracy on the demo's labelled tiles clearly beats chance (1/3) and the
same network untrained (measured: 0.667 untrained -> 0.750 trained). At this size the linear probe stays at the
majority class (0.333); on the demo variant (100 steps) it goes 0.333 -> 1.000 (experiments/uni_vitl16.py)."""
import os

import jax
import pytest

from medjax import config as config_lib
from medjax.checkpoint import restore_params
from medjax.tasks.uni_pretrain import UNIPretrainTask

STEPS = 30
EVAL = ["uni_eval.abmil.enabled=False", "uni_eval.fewshot.enabled=False", "uni_eval.bootstrap.samples=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medjax import train

    workdir = str(tmp_path_factory.mktemp("uni_demo") / "run")
    overrides = [f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.log_every=10", "mesh.num_devices=4"]
    assert train.main(["--exp", "uni_vitl16", "--variant", "tiny", "--workdir", workdir,
                       *[a for o in overrides for a in ("--set", o)]]) == 0
    return workdir


def test_knn_beats_chance_and_the_untrained_encoder(trained):
    config = config_lib.get_config("uni_vitl16", "tiny", EVAL)
    assert config.model.layerscale_init == 0.1 and config.teacher.momentum == 0.95
    task = UNIPretrainTask(config, log=lambda *_: None)
    after = task.evaluate(restore_params(trained))
    before = task.evaluate(task.init_params(jax.random.key(int(config.seed))))
    print({k: (round(before[k], 3), round(after[k], 3)) for k in after if "balanced_acc" in k})
    chance = after["linear/balanced_acc_chance"]
    assert chance == pytest.approx(1 / 3, abs=0.01)  # three tissue classes, balanced accuracy
    assert after["knn/balanced_acc"] >= chance + 0.25, (after, chance)
    assert after["knn/balanced_acc"] >= before["knn/balanced_acc"] + 0.05, (after, before)
    assert os.path.isdir(os.path.join(trained, "checkpoints", str(STEPS)))
