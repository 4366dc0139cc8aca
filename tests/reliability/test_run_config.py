"""Run settings that would crash later or lose work are refused before anything is built or written."""
import pytest

from medjax.trainer import validate_run_config
from tests.toy_task import toy_config


@pytest.mark.parametrize("override", ["train.keep_checkpoints=0", "train.steps=0", "train.log_every=0",
                                      "train.grad_accum=0", "train.batch_size=-8", "train.stop_at=-1",
                                      "optim.lr=0", "optim.lr=nan", "optim.lr=inf", "optim.lr=-1e-3"])
def test_bad_run_settings_are_refused_naming_the_key(override):
    config = toy_config()
    key, value = override.split("=")
    block, field = key.split(".")
    config[block][field] = float(value) if block == "optim" else int(value)
    with pytest.raises(ValueError, match=f"config {key}="):
        validate_run_config(config)


def test_good_run_settings_pass():
    validate_run_config(toy_config())
