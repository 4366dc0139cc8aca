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
from medjax.tasks.uni_pretrain import BatchMasks, dinov2_init


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


def test_dinov2_init_weights():
    rng = np.random.default_rng(0)
    params = {"backbone": {"blocks": {"attn": {"query": {"kernel": nn.Partitioned(jnp.asarray(rng.normal(size=(4, 64, 2, 32)),
                                                                                              jnp.float32), (None,) * 4),
                                                         "bias": jnp.ones((4, 2, 32))}},
                                      "mlp": {"fc1": {"kernel": jnp.ones((4, 64, 256)), "bias": jnp.ones((4, 256))}},
                                      "norm1": {"scale": jnp.full((4, 64), 3.0)}, "ls1": jnp.full((4, 64), 1e-5)},
                           "cls_token": jnp.ones((1, 1, 64)), "pos_embed": jnp.ones((1, 17, 64)),
                           "patch_embed": {"proj": {"kernel": jnp.ones((8, 8, 3, 64))}}},
              "dino_head": {"mlp_0": {"kernel": jnp.ones((64, 512)), "bias": jnp.ones((512,))},
                            "last_layer": {"kernel": jnp.ones((16, 64)), "gain": jnp.ones((64,))}}}
    out = dinov2_init(params, jax.random.key(0))
    query = out["backbone"]["blocks"]["attn"]["query"]["kernel"]
    assert isinstance(query, nn.Partitioned) and query.names == (None,) * 4  # boxes kept
    for kernel in (query.value, out["backbone"]["blocks"]["mlp"]["fc1"]["kernel"], out["dino_head"]["mlp_0"]["kernel"],
                   out["backbone"]["pos_embed"]):
        assert abs(float(jnp.std(kernel)) - 0.02) < 0.002 and abs(float(jnp.mean(kernel))) < 0.002
    for bias in (out["backbone"]["blocks"]["attn"]["query"]["bias"], out["backbone"]["blocks"]["mlp"]["fc1"]["bias"],
                 out["dino_head"]["mlp_0"]["bias"]):
        assert not np.asarray(bias).any()
    assert 0 < float(jnp.abs(out["backbone"]["cls_token"]).max()) < 1e-5
    for path in (("backbone", "blocks", "norm1", "scale"), ("backbone", "blocks", "ls1"),
                 ("backbone", "patch_embed", "proj", "kernel"), ("dino_head", "last_layer", "kernel"),
                 ("dino_head", "last_layer", "gain")):
        a, b = params, out
        for key in path:
            a, b = a[key], b[key]
        assert a is b, path  # untouched
    assert config_lib.get_config("uni_vitl16", "full").model.weight_init == "dinov2"
