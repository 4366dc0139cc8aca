"""Fixed 2D sin-cos position embeddings against MAE's `get_2d_sincos_pos_embed`, written out element by element,
and MRM's use of them (the table is the init value and the optimizer leaves it fixed)."""
import math
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import optim as optim_lib
from medjax.nn.sincos import sincos_2d
from medjax.nn.vit import ViTEncoder
from medjax.tasks import build_task


def _mae_formula(width, grid):
    """MAE util/pos_embed.py: emb_h from grid[0] of meshgrid(w, h) (the column), emb_w from the row; each
    1D half = [sin(p omega), cos(p omega)], omega_k = 1 / 10000 ** (k / (D / 4))."""
    quarter = width // 4
    table = np.zeros((1 + grid * grid, width))  # class token row: zeros
    for r in range(grid):
        for c in range(grid):
            row = table[1 + r * grid + c]
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                row[k], row[quarter + k] = math.sin(c * omega), math.cos(c * omega)
                row[2 * quarter + k], row[3 * quarter + k] = math.sin(r * omega), math.cos(r * omega)
    return table


def test_sincos_table_is_the_mae_formula():
    np.testing.assert_allclose(sincos_2d(16, 3, class_token=True), _mae_formula(16, 3), rtol=1e-6, atol=1e-6)
    assert sincos_2d(8, 2).shape == (4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(6, 2)


def test_vit_encoder_sincos_init():
    encoder = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, pos_embed_init="sincos")
    values = nn.meta.unbox(jax.jit(encoder.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))
    assert values["params"]["pos_embed"].shape == (1, 17, 16)
    np.testing.assert_allclose(values["params"]["pos_embed"][0], _mae_formula(16, 4), rtol=1e-5, atol=1e-6)


def test_mrm_position_table_is_frozen(fundus_demo):
    config = config_lib.get_config("mrm_retina", "tiny", [f"data.dir={fundus_demo}"])
    assert config.model.pos_embed == "sincos"
    task = build_task(config, log=lambda *_: None)
    params = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    labels = optim_lib.frozen_labels(task.optim_config(), params)  # frozen: no update, no weight decay
    assert labels["image_encoder"]["pos_embed"] == "frozen" and labels["image_encoder"]["cls_token"] == "trained"
    assert sum(v == "frozen" for v in jax.tree.leaves(labels)) == 1
    learned = config_lib.get_config("mrm_retina", "tiny", ["model.pos_embed=learned"])
    assert type(task).optim_config(SimpleNamespace(config=learned)) is learned.optim
