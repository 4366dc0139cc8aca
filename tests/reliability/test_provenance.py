"""`evaluate` / `predict` with params of another experiment, variant or task (issue #15: a flax scope error)
get an error naming the file, what wrote it and what was expected; every checkpoint and params dir records
its experiment, variant and model config; an old one without the record still loads, with a warning."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.checkpoint import save_params
from medjax.evaluate import restore_checked
from medjax.predict import load_universal
from medjax.provenance import PROVENANCE, ProvenanceError, run_record
from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config


def _toy(**data):
    config = toy_config(steps=2, checkpoint_every=2)
    config.mesh.num_devices = 1
    config.exp, config.variant = "toy_exp", "tiny"
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    config = _toy()
    Trainer(config, ToyTask(config), str(workdir)).run()
    return workdir


def test_checkpoints_record_experiment_variant_and_model(toy_workdir):
    with open(toy_workdir / "checkpoints" / "2" / PROVENANCE) as f:
        assert json.load(f) == {"exp": "toy_exp", "variant": "tiny", "task": "toy", "model": None}
    config = _toy()
    directory, record, params = restore_checked(str(toy_workdir), config, ToyTask(config))
    assert directory == str(toy_workdir / "checkpoints" / "2") and record["exp"] == "toy_exp"
    assert params["Dense_0"]["kernel"].shape == (8, 16)


def test_params_of_another_variant_name_the_file_and_the_fix(toy_workdir):
    config = _toy(features=4)
    config.variant = "small"
    with pytest.raises(ProvenanceError) as error:
        restore_checked(str(toy_workdir), config, ToyTask(config))
    assert str(error.value) == (
        f"--checkpoint {toy_workdir}/checkpoints/2: holds params of experiment 'toy_exp' variant 'tiny' (task "
        "'toy') that do not fit experiment 'toy_exp' variant 'small' (pass --variant tiny): Dense_0/kernel shape "
        "(8, 16) vs (4, 16) expected")


def test_params_of_another_task_are_refused_before_loading(toy_workdir):
    config = _toy()
    config.task = "fundus_classification"
    with pytest.raises(ProvenanceError, match=f"{toy_workdir}/checkpoints/2/{PROVENANCE}: params of experiment "
                                              "'toy_exp' variant 'tiny' \\(task 'toy'\\); --exp toy_exp expects "
                                              "params of task 'fundus_classification'"):
        restore_checked(str(toy_workdir), config, ToyTask(_toy()))


def test_a_checkpoint_without_a_record_loads_with_a_warning(toy_workdir, tmp_path):
    import shutil

    workdir = tmp_path / "old"
    shutil.copytree(toy_workdir, workdir)
    os.remove(workdir / "checkpoints" / "2" / PROVENANCE)
    os.remove(workdir / "checkpoints" / "2" / "medjax_checksums.json")  # an old step: neither file
    config = _toy()
    with pytest.warns(UserWarning, match="no medjax_provenance.json .*cannot check that it holds params of "
                                         "experiment 'toy_exp' variant 'tiny'"):
        _, record, params = restore_checked(str(workdir), config, ToyTask(config))
    assert record is None and params["Dense_0"]["kernel"].shape == (8, 16)


def test_predict_with_params_of_another_backbone_names_both(tmp_path):
    swin = config_lib.get_config("universal_swin", "tiny")
    from medjax.models import universal as universal_lib
    from medjax.tasks.base import model_config

    model = universal_lib.universal_from_config(model_config(swin))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, *tuple(swin.data.crop_size), 1), jnp.float32)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
    path = save_params(str(tmp_path / "swin"), params, provenance=run_record(swin))
    unet = config_lib.get_config("universal_unet", "tiny")
    with pytest.raises(ProvenanceError) as error:
        load_universal(unet, path)
    message = str(error.value)
    assert message.startswith(f"--params {path}: holds params of experiment 'universal_swin' variant 'tiny' "
                              "(task 'universal') that do not fit experiment 'universal_unet' variant 'tiny': ")
    assert "missing" in message and "model.backbone: 'swinunetr' saved vs 'unet' expected" in message
    model_back, variables = load_universal(swin, path)  # the matching experiment loads
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
