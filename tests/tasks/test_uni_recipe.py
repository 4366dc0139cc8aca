"""DINOv2's recipe items of uni_vitl16: the DINO head's weight-norm gain is a parameter, weight-decayed, frozen with
the last layer for the first epoch and trained after it; the blur probabilities DINOv2's code runs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import config as config_lib
from medjax import optim
from medjax.data.pipelines.wsi_tiles import DINOV2_CODE_BLUR_PROBS
from medjax.models.dinov2 import DINOHead


def test_head_gain_is_trained_decayed_and_frozen_in_the_first_epoch():
    config = config_lib.get_config("uni_vitl16", "tiny")
    assert config_lib.get_config("uni_vitl16", "full").head.learn_gain
    h = config.head  # the student's DINO head, as network_from_config builds it (the backbone plays no part here)
    head = DINOHead(h.out_dim, h.hidden_dim, h.bottleneck_dim, num_layers=h.num_layers, learn_gain=h.learn_gain)
    params = {"student": {"dino_head": nn.unbox(head.init(jax.random.key(0), jnp.ones((2, config.model.width))))["params"]}}
    gain = params["student"]["dino_head"]["last_layer"]["gain"]
    np.testing.assert_array_equal(gain, np.ones(config.head.out_dim))  # DINOv2 fills weight_g with 1
    assert optim.wd_multipliers(config.optim, params)["student/dino_head/last_layer/gain"] == 1.0

    total = int(config.train.steps)
    tx, _ = optim.make_optimizer(config.optim, total, int(config.train.batch_size))
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["student"]["dino_head"]["last_layer"]["gain"] = jnp.full_like(gain, 0.5)
    frozen_steps = int(config.optim.frozen_early_steps)
    assert frozen_steps == int(config.schedule.epoch_length) >= 1
    current = params
    for step in range(frozen_steps + 2):
        updates, state = update(grads, state, current)
        new = jax.tree.map(lambda p, u: p + u, current, updates)
        moved = np.abs(np.asarray(new["student"]["dino_head"]["last_layer"]["gain"]) - np.asarray(
            current["student"]["dino_head"]["last_layer"]["gain"])).max()
        if step < frozen_steps:
            assert moved == 0.0, step  # the first epoch: lr 0 for the last layer, gain included
        current = new
    assert moved > 0.0  # trained afterwards (a positive gradient: it decreases)
    assert float(current["student"]["dino_head"]["last_layer"]["gain"][0]) < 1.0


def test_blur_probabilities_are_dinov2s_code():
    assert tuple(config_lib.get_config("uni_vitl16", "full").crops.blur_probs) == DINOV2_CODE_BLUR_PROBS == (0.0, 0.9, 0.5)
