import pytest

from medjax import config as config_lib


@pytest.mark.parametrize("exp", config_lib.available_experiments())
def test_every_experiment_and_variant_loads(exp):
    module = config_lib.load_experiment(exp)
    for variant in ("full", "demo", "tiny"):
        config = config_lib.get_config(exp, variant)
        for key in ("seed", "train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "optim.lr"):
            node = config
            for part in key.split("."):
                node = node[part]
            assert node is not None, key
        assert config.exp == exp and config.variant == variant
    assert module.get_config().variant == "full"


def test_overrides_are_typed():
    config = config_lib.get_config("mrm_retina", "tiny", [
        "optim.lr=3e-4", "train.steps=7", "data.hflip=false", "data.dir=/x", "model.tau_image=0.25"])
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.data.hflip is False and config.data.dir == "/x" and config.model.tau_image == 0.25


def test_unknown_key_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="optim.lrr.*did you mean lr"):
        config_lib.get_config("mrm_retina", "tiny", ["optim.lrr=1"])
    with pytest.raises(config_lib.ConfigError, match="nope"):
        config_lib.get_config("mrm_retina", "tiny", ["nope.x=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="train.steps=ten.*int"):
        config_lib.get_config("mrm_retina", "tiny", ["train.steps=ten"])
    with pytest.raises(config_lib.ConfigError, match="data.hflip"):
        config_lib.get_config("mrm_retina", "tiny", ["data.hflip=maybe"])


def test_unknown_experiment_and_variant():
    with pytest.raises(config_lib.ConfigError, match="mrm_retina"):
        config_lib.get_config("mrm_retna")
    with pytest.raises(ValueError, match="variant"):
        config_lib.get_config("mrm_retina", "huge")
