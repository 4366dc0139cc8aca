"""The Universal task initialises at INIT_SIZE^3 whatever the crop: the same param tree (paths, shapes,
dtypes) as an init at the crop itself, from a 27x smaller graph at 96^3. Values need no second init to
compare: flax draws every param from the rng folded with the param's path, not from the input."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from medjax.models.universal import UniversalModel, make_backbone
from medjax.tasks.universal import INIT_SIZE, UniversalTask


def _tree(params):
    return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(params)]


@pytest.mark.parametrize("backbone", ["swinunetr", "unet"])
def test_init_at_a_small_volume_gives_the_param_tree_of_the_crop(backbone):
    model = UniversalModel(make_backbone(backbone, feature_size=12), encoding="rand_embedding",
                           norm_groups=4 if backbone == "swinunetr" else 16)
    crop = (2 * INIT_SIZE, INIT_SIZE, INIT_SIZE)
    images = []

    def init(rng):  # records the volume init traces
        task = SimpleNamespace(model=SimpleNamespace(init=lambda r, x: images.append(x.shape) or model.init(r, x)),
                               crop_size=crop)
        return UniversalTask.init_params(task, rng)

    small = jax.eval_shape(init, jax.random.PRNGKey(0))
    at_crop = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, *crop, 1)))["params"],
                             jax.random.PRNGKey(0))
    assert images == [(1, INIT_SIZE, INIT_SIZE, INIT_SIZE, 1)]
    assert _tree(small) == _tree(at_crop)
    if backbone == "swinunetr":
        assert sum("relative_position_bias_table" in path for path, _, _ in _tree(small)) == 8
