"""A rerun of a finished run stops at once, without compiling or writing a new event file (issue #23)."""
import os

from medjax import checkpoint_integrity as integrity
from medjax import config as config_lib
from medjax import provenance, train
from medjax.checkpoint import finished_step


def _fake_finished_run(workdir, config, step):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    os.makedirs(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "state", "data"), "wb") as f:
        f.write(b"params")
    provenance.write_record(step_dir, provenance.run_record(config))
    integrity.record_checksums(step_dir)
    return step_dir


def test_only_a_verified_final_checkpoint_of_the_same_config_counts(tmp_path, capsys):
    config = config_lib.get_config("mrm_retina", "tiny", ["train.steps=4"])
    workdir = str(tmp_path / "run")
    assert finished_step(workdir, config) is None  # no checkpoints yet
    step_dir = _fake_finished_run(workdir, config, 4)
    assert finished_step(workdir, config) == 4
    assert finished_step(workdir, config_lib.get_config("mrm_retina", "tiny", ["train.steps=8"])) is None
    assert finished_step(workdir, config_lib.get_config("mrm_retina", "tiny", ["train.steps=8",
                                                                                "train.stop_at=4"])) == 4
    assert finished_step(workdir, config_lib.get_config("mrm_retina", "demo", ["train.steps=4"])) is None
    assert train.main(["--exp", "mrm_retina", "--variant", "tiny", "--workdir", workdir,
                       "--set", "train.steps=4"]) == 0
    assert "nothing to do: " in capsys.readouterr().out and not os.path.exists(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(step_dir, "state", "data"), "wb") as f:
        f.write(b"damage")
    assert finished_step(workdir, config) is None  # the full resume path handles (and reports) damage
