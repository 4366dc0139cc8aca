"""DINOv2's recipe items of uni_vitl16: the DINO head's weight-norm gain is a parameter, weight-decayed, frozen with
the last layer for the first epoch and trained after it; the blur probabilities DINOv2's code runs; iBOT masks drawn
per batch as DINOv2's collate."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import config as config_lib
from medjax import optim
from medjax.data.pipelines.wsi_tiles import DINOV2_CODE_BLUR_PROBS
from medjax.data.transforms.block_masking import MaskingGenerator, max_masked_patches
from medjax.models.dinov2 import DINOHead
from medjax.tasks.uni_pretrain import BatchMasks


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


def test_ibot_masks_are_drawn_per_batch_as_dinov2s_collate():
    generator = MaskingGenerator(14, max_num_patches=0.5 * 196)  # 224 / 16, DINOv2 train.py
    draw = BatchMasks(generator, (0.1, 0.5), 0.5)
    b = 32
    batch = {"global_crops": np.zeros((b, 2, 1, 1, 3), np.float32)}
    out = draw(batch, np.random.default_rng(0))
    masks = out["masks"]
    assert masks.shape == (b, 2, 196) and out["global_crops"] is batch["global_crops"]
    counts = masks.sum(-1).ravel()
    assert (counts > 0).sum() == int(2 * b * 0.5)  # int(2B * 0.5) of the 2B global crops are masked
    per_sample = (masks.sum(-1) > 0).sum(1)
    assert {0, 1, 2} <= set(per_sample.tolist())  # shuffled across crops: samples with 0, 1 and 2 masked crops
    # Stratified: the i-th smallest masked fraction lies in bin i of linspace(0.1, 0.5, 33) (block masking may
    # fall a few patches short of its target, never over it).
    bins = np.linspace(0.1, 0.5, int(2 * b * 0.5) + 1)
    fractions = np.sort(counts[counts > 0]) / 196
    assert (fractions <= bins[1:] + 1e-9).all() and (fractions >= bins[:-1] - 0.05).all()
    # The static buffer is DINOv2's upperbound for the 2B crops, well under 98 slots per sample.
    task_buffer = max_masked_patches(196, 2 * b, ratio_range=(0.1, 0.5), probability=0.5)
    assert counts.sum() <= task_buffer < b * 98
    assert task_buffer == sum(int(196 * hi) for hi in bins[1:])
    # Reproducible from the batch's rng; different batches differ.
    np.testing.assert_array_equal(draw(batch, np.random.default_rng(0))["masks"], masks)
    assert (draw(batch, np.random.default_rng(1))["masks"] != masks).any()
