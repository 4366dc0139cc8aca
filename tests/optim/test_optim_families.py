"""medjax.optim builds every family's optimizer from config: the same updates as the hand-written
optimizers it replaced (tests/optim/legacy_optimizers.py), frozen params bit-identical, the schedules'
shapes, and layer-wise decay on a scanned block stack."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import config as config_lib
from medjax import optim as optim_lib
from medjax.tasks.ptunifier import POOL_PARAMS
from tests.optim import legacy_optimizers as legacy

STEPS = 20  # warmup >= 1 step in every family at this length


def _tree(spec: dict, rng: np.random.Generator):
    return {k: _tree(v, rng) if isinstance(v, dict) else rng.normal(size=v).astype(np.float32) for k, v in spec.items()}


VIT = {"encoder": {"patch_embed": {"kernel": (4, 3), "bias": (3,)}, "pos_embed": (1, 5, 3), "cls_token": (1, 1, 3),
                   "blocks_0": {"norm1": {"scale": (3,), "bias": (3,)}, "attn": {"query": {"kernel": (3, 3)}}},
                   "norm": {"scale": (3,)}},
       "head": {"kernel": (3, 2), "bias": (2,)}}
NET = {"backbone": {"patch_embed": {"proj": {"kernel": (4, 3), "bias": (3,)}}, "pos_embed": (1, 5, 3),
                    "cls_token": (1, 1, 3), "mask_token": (1, 3),
                    "blocks_0": {"norm1": {"scale": (3,)}, "ls1": (3,), "attn": {"query": {"kernel": (3, 3)}}},
                    "blocks_1": {"mlp": {"fc1": {"kernel": (3, 6), "bias": (6,)}}}, "norm": {"scale": (3,)}},
       "dino_head": {"mlp_0": {"kernel": (3, 4), "bias": (4,)}, "last_layer": {"kernel": (4, 8), "gain": (8,)}}}
DINO = {"student": NET, "teacher": NET, "center": (1, 8), "ibot_center": (1, 8), "teacher_temp": ()}
PTUNIFIER = {"text": {"layers_0": {"fc1": {"kernel": (3, 4), "bias": (4,)}, "ln": {"scale": (3,)}}},
             "vision": {"ln_pre": {"scale": (3,), "bias": (3,)}}, "modality_type": {"embedding": (2, 3)},
             "fusion_0": {"text": {"fc1": {"kernel": (3, 4), "bias": (4,)}}}, "text_pooler": {"kernel": (3, 3)},
             "mlm_transform": {"kernel": (3, 3), "bias": (3,)}, "mlm_bias": (5,), "itc_text_proj": {"kernel": (3, 2)},
             "itm_head": {"kernel": (3, 2)}, "task_head": {"kernel": (3, 2), "bias": (2,)},
             "visual_prompts": {"pool": (4, 3)}, "textual_prompts": {"pool": (4, 3)}}


def _trajectory(tx, params, steps=6, seed=1):
    """Params after each of `steps` updates with random gradients (the same draws for every tx)."""
    rng, state, out = np.random.default_rng(seed), tx.init(params), []
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _assert_same(new_tx, old_tx, params, rtol=2e-6):
    for new, old in zip(_trajectory(new_tx, params), _trajectory(old_tx, params), strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-9),
                     new, old)


@pytest.mark.parametrize("exp", ["mrm_retina", "mrm_aptos", "universal_swin"])
def test_adamw_families_match_their_previous_optimizer(exp):
    optim = config_lib.get_config(exp, "tiny", ["optim.warmup_steps=3"]).optim
    new_tx, new_lr = optim_lib.make_optimizer(optim, STEPS)
    old_tx, old_lr = (legacy.universal_optimizer if exp.startswith("universal") else legacy.make_optimizer)(optim, STEPS)
    for step in (0, 1, 3, 10, STEPS, STEPS + 5):
        np.testing.assert_allclose(float(new_lr(step)), float(old_lr(step)), rtol=1e-6, atol=1e-12)
    _assert_same(new_tx, old_tx, _tree(VIT, np.random.default_rng(0)))


def test_universal_decays_every_param_as_torch_adamw():
    optim = config_lib.get_config("universal_swin", "tiny").optim
    decay = optim_lib.wd_multipliers(optim, _tree(VIT, np.random.default_rng(0)))
    assert set(decay.values()) == {1.0}
    default = optim_lib.wd_multipliers(config_lib.get_config("mrm_retina", "tiny").optim, _tree(VIT, np.random.default_rng(0)))
    assert default["encoder/patch_embed/bias"] == 0.0 and default["encoder/pos_embed"] == 1.0  # ndim >= 2


def test_dinov2_matches_its_previous_optimizer():
    config = config_lib.get_config("uni_vitl16", "tiny")  # epoch 2 steps, batch 4, depth 2
    config.optim.lr = config_lib.get_config("uni_vitl16", "full").optim.lr  # the recipe's base lr (tiny raises it)
    new_tx, new_lr = optim_lib.make_optimizer(config.optim, STEPS, global_batch=4)
    old = SimpleNamespace(lr=4e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4, b1=0.9,
                          b2=0.999, eps=1e-8, clip_grad=3.0, layer_decay=0.9, patch_embed_lr_mult=0.2,
                          freeze_last_layer_epochs=1)
    old_tx, old_lr = legacy.dinov2_optimizer(old, epoch=2, depth=2, global_batch=4, total_steps=STEPS)
    for step in range(STEPS + 2):
        np.testing.assert_allclose(float(new_lr(step)), float(old_lr(step)), rtol=1e-6)
    params = _tree(DINO, np.random.default_rng(0))
    _assert_same(new_tx, old_tx, params)
    state = new_tx.init(params)  # Adam moments for the student only (teacher and centers are set_to_zero)
    assert sum(np.size(x) for x in jax.tree.leaves(state)) < 2.2 * sum(np.size(x) for x in jax.tree.leaves(params["student"]))


@pytest.mark.parametrize("released", [False, True])
def test_ptunifier_pretraining_matches_its_previous_optimizer(released):
    optim = config_lib.get_config("ptunifier", "tiny").optim
    if released:  # what PTUnifierTask.optim_config adds with reproduce_released_code
        optim.frozen = [POOL_PARAMS]
    new_tx, new_lr = optim_lib.make_optimizer(optim, STEPS)
    old = SimpleNamespace(lr=1e-3, warmup_ratio=0.1, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                          lr_multiplier_head=5.0, lr_multiplier_multi_modal=5.0, clip_norm=0.0)
    old_tx, old_lr = legacy.ptunifier_optimizer(old, released, STEPS)
    for step in range(STEPS + 2):
        np.testing.assert_allclose(float(new_lr(step)), float(old_lr(step)), rtol=1e-6, atol=1e-12)
    params = _tree(PTUNIFIER, np.random.default_rng(0))
    _assert_same(new_tx, old_tx, params)
    if released:
        after = _trajectory(new_tx, params)[-1]
        for pool in ("visual_prompts", "textual_prompts"):  # frozen: bit-identical after the steps
            np.testing.assert_array_equal(after[pool]["pool"], params[pool]["pool"])


def test_ptunifier_finetuning_matches_its_previous_optimizer():
    optim = config_lib.get_config("ptunifier_vqa", "tiny").optim  # heads x50, multi-modal x5
    new_tx, new_lr = optim_lib.make_optimizer(optim, STEPS)
    old = SimpleNamespace(lr=float(optim.lr), warmup_fraction=0.1, multi_modal_multiplier=5.0, head_multiplier=50.0,
                          b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, clip_norm=0.0)
    old_tx, old_lr = legacy.finetune_optimizer(old, STEPS)
    for step in range(STEPS + 2):
        np.testing.assert_allclose(float(new_lr(step)), float(old_lr(step)), rtol=1e-6, atol=1e-12)
    _assert_same(new_tx, old_tx, _tree(PTUNIFIER, np.random.default_rng(0)), rtol=5e-6)


def test_frozen_regex_leaves_params_bit_identical():
    optim = config_lib.get_config("mrm_retina", "tiny", ["optim.frozen=['^encoder/blocks_']", "optim.clip_norm=0.5"]).optim
    tx, _ = optim_lib.make_optimizer(optim, STEPS)
    params = _tree(VIT, np.random.default_rng(0))
    after = _trajectory(tx, params)[-1]
    np.testing.assert_array_equal(after["encoder"]["blocks_0"]["attn"]["query"]["kernel"],
                                  params["encoder"]["blocks_0"]["attn"]["query"]["kernel"])
    assert not np.array_equal(after["head"]["kernel"], params["head"]["kernel"])


def test_schedules():
    cosine = optim_lib.warmup_then_decay(1.0, 0.1, total_steps=10, warmup=2, kind="cosine")
    np.testing.assert_allclose([float(cosine(t)) for t in (0, 1, 2, 6, 10, 12)],
                               [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    linear = optim_lib.warmup_then_decay(1.0, 0.0, total_steps=10, warmup=2, kind="linear")
    np.testing.assert_allclose([float(linear(t)) for t in (1, 2, 6, 10)], [0.5, 1.0, 0.5, 0.0], atol=1e-7)
    linspace = optim_lib.warmup_then_decay(1.0, 0.0, total_steps=10, warmup=3, kind="constant", linspace=True)
    np.testing.assert_allclose([float(linspace(t)) for t in (0, 1, 2, 3)], [0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="not both"):
        optim_lib.warmup_steps(SimpleNamespace(get=lambda k, d=None: {"warmup_steps": 3, "warmup_fraction": 0.1}[k]), 10)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim_lib.warmup_then_decay(1.0, 0.0, 10, 0, kind="step")


def test_layer_decay_on_a_scanned_block_stack_equals_the_unrolled_blocks():
    optim = config_lib.get_config("uni_vitl16", "tiny").optim
    leaf = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    unrolled = {"student": {"backbone": {"pos_embed": leaf(1, 3), **{f"blocks_{i}": {"mlp": {"kernel": leaf(3, 4)}}
                                                                      for i in range(3)}}}}
    scanned = {"student": {"backbone": {"pos_embed": leaf(1, 3), "blocks": {"mlp": {"kernel": leaf(3, 3, 4)}}}}}
    a, b = optim_lib.lr_multipliers(optim, unrolled), optim_lib.lr_multipliers(optim, scanned)
    stacked = np.asarray(b["student/backbone/blocks/mlp/kernel"])
    assert stacked.shape == (3, 1, 1)
    np.testing.assert_allclose(stacked[:, 0, 0], [a[f"student/backbone/blocks_{i}/mlp/kernel"] for i in range(3)], rtol=1e-6)
    assert a["student/backbone/pos_embed"] == b["student/backbone/pos_embed"] == pytest.approx(0.9 ** 4)
    tx, _ = optim_lib.make_optimizer(optim, STEPS, global_batch=4)
    params = jax.tree.map(jnp.ones_like, scanned)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, scanned), tx.init(params), params)
    assert updates["student"]["backbone"]["blocks"]["mlp"]["kernel"].shape == (3, 3, 4)


def test_unknown_optimizer_and_sgd():
    optim = config_lib.get_config("mrm_retina", "tiny").optim
    optim.name = "adagrad"
    with pytest.raises(ValueError, match="optim.name"):
        optim_lib.make_optimizer(optim, STEPS)
    optim.update(dict(name="sgd", b1=0.0, weight_decay=0.0, clip_norm=0.0, warmup_steps=0, schedule="constant"))
    tx, _ = optim_lib.make_optimizer(optim, STEPS)
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 2.0)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -2.0 * float(optim.lr))
