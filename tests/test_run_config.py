"""medjax.config.run_config: evaluate / predict / generate rebuild the model a run trained (its config.json's
variant and model block, e.g. a `--set model.depth=3` at training time); command-line overrides win."""
import pytest

from medjax import config as config_lib

SAVED = {"variant": "tiny", "data": {"dir": "/runs/data"},
         "model": {"depth": 3, "mlp_ratio": 2, "mask_layers": [1], "relation_output": 5, "renamed_key": 1}}


def test_the_saved_model_block_and_data_dir_are_reapplied():
    config = config_lib.run_config("mrm_retina", SAVED)
    fresh = config_lib.get_config("mrm_retina", "tiny")
    assert config.variant == "tiny" and config.data.dir == "/runs/data"
    assert config.model.depth == 3 and fresh.model.depth == 2
    assert config.model.mlp_ratio == 2.0 and isinstance(config.model.mlp_ratio, float)
    assert list(config.model.mask_layers) == [1]
    assert config.model.relation_output == fresh.model.relation_output  # a value of another type is not taken
    assert "renamed_key" not in config.model
    assert config.model.width == fresh.model.width  # what the run did not change stays the variant's


def test_command_line_overrides_win_and_converted_weights_get_the_variant():
    config = config_lib.run_config("mrm_retina", SAVED, overrides=["model.depth=4", "data.dir=/mine"])
    assert config.model.depth == 4 and config.data.dir == "/mine"
    plain = config_lib.run_config("mrm_retina", {}, "tiny")
    assert plain.to_dict() == config_lib.get_config("mrm_retina", "tiny").to_dict()
    with pytest.raises(config_lib.ConfigError, match="model.dpeth"):
        config_lib.run_config("mrm_retina", SAVED, overrides=["model.dpeth=4"])
