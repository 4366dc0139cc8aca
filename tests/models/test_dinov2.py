"""DINOv2 pieces: weight-normalised head, masked-token buffer, EMA/center/temperature post-update, the
optimizer (frozen teacher, layer-wise lr, weight-decay groups, last-layer freeze, per-submodule clip) and
DINOv2's CosineScheduler."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import config as config_lib
from medjax import optim as optim_lib
from medjax.models.dinov2 import DINOHead, ema_update, masked_token_index
from medjax.tasks.uni_pretrain import UNIPretrainTask, cosine_schedule


@pytest.fixture(scope="module")
def task():
    """tiny's shapes with the recipe's teacher momentum and base lr (tiny and demo raise both for short runs)."""
    config = config_lib.get_config("uni_vitl16", "tiny")
    full = config_lib.get_config("uni_vitl16", "full")
    config.teacher.momentum, config.optim.lr = full.teacher.momentum, full.optim.lr
    return UNIPretrainTask(config, log=lambda *_: None)  # no data is read


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_dino_head_is_mlp_l2norm_then_weight_normalised_layer():
    head = DINOHead(out_dim=6, hidden_dim=16, bottleneck_dim=4, num_layers=3)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    variables = jax.jit(head.init)(jax.random.key(1), x)
    apply = jax.jit(head.apply)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
    h = gelu(x @ p["mlp_0"]["kernel"] + p["mlp_0"]["bias"])
    h = gelu(h @ p["mlp_1"]["kernel"] + p["mlp_1"]["bias"])
    h = h @ p["mlp_2"]["kernel"] + p["mlp_2"]["bias"]
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    v = p["last_layer"]["kernel"]
    expected = h @ (v / np.linalg.norm(v, axis=0, keepdims=True))
    got = np.asarray(apply(variables, x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() <= 1.0 + 1e-5  # cosines: unit input, unit weight columns, gain 1
    # Only directions matter: scaling the weight columns changes nothing.
    scaled = jax.tree.map(lambda a: a, variables)
    scaled["params"]["last_layer"]["kernel"] = variables["params"]["last_layer"]["kernel"].replace_boxed(
        jnp.asarray(v * np.array([3.0, 0.5, 2.0, 7.0, 1.0, 0.1]), jnp.float32))
    np.testing.assert_allclose(np.asarray(apply(scaled, x)), got, rtol=1e-4, atol=1e-5)
    assert "gain" not in variables["params"]["last_layer"]
    gained = jax.eval_shape(DINOHead(6, 16, 4, learn_gain=True).init, jax.random.key(0), x)
    assert gained["params"]["last_layer"]["gain"].value.shape == (6,)
    assert tuple(nn.get_partition_spec(variables)["params"]["last_layer"]["kernel"]) == (None, "vocab")


def test_dino_v1_batch_norm_head():
    """head.use_bn = DINO v1's use_bn_in_head: BatchNorm1d (training mode: this call's batch statistics, biased
    variance, eps 1e-5) after each hidden Linear, before the GELU; gain_init scales the fixed weight-norm gain."""
    x = np.random.default_rng(2).normal(size=(7, 8)).astype(np.float32) + 3.0
    head = DINOHead(out_dim=6, hidden_dim=16, bottleneck_dim=4, num_layers=3, use_bn=True, gain_init=2.0)
    # random values of the shapes init gives (no init compile); BatchNorm's scale / bias random too
    shapes = nn.unbox(jax.eval_shape(head.init, jax.random.key(1), x))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert sorted(p) == ["batch_norm_0", "batch_norm_1", "last_layer", "mlp_0", "mlp_1", "mlp_2"]

    def bn(h, name):
        mean, var = h.mean(0), h.var(0)
        return (h - mean) / np.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

    h = gelu(bn(x @ p["mlp_0"]["kernel"] + p["mlp_0"]["bias"], "batch_norm_0"))
    h = gelu(bn(h @ p["mlp_1"]["kernel"] + p["mlp_1"]["bias"], "batch_norm_1"))
    h = h @ p["mlp_2"]["kernel"] + p["mlp_2"]["bias"]
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    v = p["last_layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(head.apply(variables, x)),
                               2.0 * h @ (v / np.linalg.norm(v, axis=0, keepdims=True)), rtol=1e-4, atol=1e-5)
    from medjax.models.dinov2 import DINOv2Network

    with pytest.raises(ValueError, match="ibot.separate_head"):
        DINOv2Network(image_size=16, patch_size=8, width=8, depth=1, num_heads=2, head_use_bn=True).init(
            jax.random.key(0), np.zeros((1, 16, 16, 3)), np.zeros((1, 8, 8, 3)), np.zeros((1, 4), bool))


def test_masked_token_index_buffer():
    masks = np.array([[False, True, True, False], [False, False, False, False], [True, False, False, False]])
    slots = jax.tree.map(np.asarray, jax.jit(masked_token_index, static_argnums=1)(masks, 5))
    np.testing.assert_array_equal(slots["index"][:3], [1, 2, 8])  # flattened (image * 4 + patch)
    np.testing.assert_array_equal(slots["valid"], [True, True, True, False, False])
    np.testing.assert_allclose(slots["weight"], [0.5, 0.5, 1.0, 0.0, 0.0])
    assert int(slots["num_masked"]) == 3


def test_ema_and_post_update(task):
    teacher, student = {"a": jnp.array([0.0, 1.0])}, {"a": jnp.array([1.0, 3.0])}
    np.testing.assert_allclose(np.asarray(ema_update(teacher, student, 0.9)["a"]), [0.1, 1.2], rtol=1e-6)
    params = {"student": student, "teacher": teacher, "teacher_temp": jnp.float32(0.04),
              "center": jnp.zeros((1, 3)), "ibot_center": jnp.ones((1, 3))}
    metrics = {"dino_loss": jnp.float32(1.0), "center_batch_mean": jnp.array([1.0, 2.0, 3.0]),
               "ibot_center_batch_mean": jnp.array([3.0, 2.0, 1.0])}
    new, out = task.post_update(params, metrics, jnp.int32(0))
    # Momentum cosine 0.992 -> 1 over train.steps = 4: 0.992 at step 0, 1 - 0.008 * (1 + cos(pi / 2)) / 2 at step 2.
    np.testing.assert_allclose(np.asarray(new["teacher"]["a"]), [0.008, 0.992 + 0.024], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["center"]), [[0.1, 0.2, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["ibot_center"]), [[1.2, 1.1, 1.0]], rtol=1e-6)
    assert float(new["teacher_temp"]) == pytest.approx(0.07)  # tiny: warmup 0.04 -> 0.07 over 2 steps
    assert set(out) == {"dino_loss", "teacher_momentum"} and float(out["teacher_momentum"]) == pytest.approx(0.992)
    assert float(task.momentum_fn(2)) == pytest.approx(1 - 0.004)
    assert float(task.momentum_fn(4)) == 1.0


def dinov2_cosine_scheduler(base, final, total, warmup=0, start=0.0, freeze=0):
    """dinov2/utils/utils.py CosineScheduler, as an array."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cosine))


@pytest.mark.parametrize("args", [(4e-3, 1e-6, 50, 10), (0.04, 0.4, 30, 0), (0.07, 0.07, 12, 12, 0.04),
                                  (0.992, 1.0, 20, 0), (1.0, 0.0, 20, 5, 0.0, 3)])
def test_cosine_schedule_is_dinov2_cosine_scheduler(args):
    expected = dinov2_cosine_scheduler(*args)
    names = ("base", "final", "total_steps", "warmup_steps", "warmup_start", "freeze_steps")
    schedule = cosine_schedule(**dict(zip(names, args)))
    got = np.array([float(schedule(t)) for t in range(args[2] + 3)])
    np.testing.assert_allclose(got[:args[2]], expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got[args[2]:], args[1])  # `final` after the schedule, as __getitem__


def network_like(value):
    leaf = lambda: jnp.full((2,), value, jnp.float32)  # noqa: E731
    return {"backbone": {"patch_embed": {"proj": {"kernel": leaf(), "bias": leaf()}}, "pos_embed": leaf(),
                         "cls_token": leaf(), "blocks_0": {"norm1": {"scale": leaf()}, "ls1": leaf(),
                                                           "attn": {"query": {"kernel": leaf()}}},
                         "blocks_1": {"mlp": {"fc1": {"kernel": leaf(), "bias": leaf()}}}, "norm": {"scale": leaf()}},
            "dino_head": {"mlp_0": {"kernel": leaf(), "bias": leaf()}, "last_layer": {"kernel": leaf()}}}


def test_param_groups_from_paths():
    """DINOv2's groups (param_groups.py) as the uni_vitl16 optim rules give them, at ViT-L depth 24."""
    optim = config_lib.get_config("uni_vitl16", "full").optim
    leaf = np.zeros((2,), np.float32)
    blocks = {f"blocks_{i}": {"attn": {"query": {"kernel": leaf}}, "mlp": {"fc2": {"bias": leaf}}, "ls2": leaf,
                              "norm2": {"scale": leaf}} for i in range(24)}
    backbone = {"patch_embed": {"proj": {"kernel": leaf}}, "pos_embed": leaf, "mask_token": leaf, "cls_token": leaf,
                "norm": {"scale": leaf}, **blocks}
    params = {"student": {"backbone": backbone, "dino_head": {"mlp_1": {"kernel": leaf}}}}
    lr = optim_lib.lr_multipliers(optim, params)
    s = "student/backbone/"
    assert lr[s + "patch_embed/proj/kernel"] == pytest.approx(0.9 ** 25 * 0.2)  # embeddings 0.9^25, x 0.2
    assert lr[s + "pos_embed"] == pytest.approx(0.9 ** 25) and lr[s + "mask_token"] == pytest.approx(0.9 ** 25)
    assert lr[s + "blocks_0/attn/query/kernel"] == pytest.approx(0.9 ** 24)
    assert lr[s + "blocks_23/mlp/fc2/bias"] == pytest.approx(0.9)
    assert lr[s + "norm/scale"] == 1.0 and lr["student/dino_head/mlp_1/kernel"] == 1.0
    wd = optim_lib.wd_multipliers(optim, params)
    assert [wd[s + p] for p in ("blocks_0/mlp/fc2/bias", "blocks_0/norm2/scale", "blocks_0/ls2", "cls_token",
                                "blocks_0/attn/query/kernel")] == [0, 0, 0, 1, 1]
    frozen = optim_lib.frozen_labels(optim, {"student": {"a": leaf}, "teacher": {"a": leaf}, "teacher_temp": leaf})
    assert frozen == {"student": {"a": "trained"}, "teacher": {"a": "frozen"}, "teacher_temp": "frozen"}


def test_optimizer_freezes_teacher_and_applies_dinov2_groups(task):
    params = {"student": network_like(0.5), "teacher": network_like(0.5), "center": jnp.zeros((1, 3)),
              "teacher_temp": jnp.float32(0.04)}
    grads = jax.tree.map(jnp.ones_like, params)
    tx, lr_fn = task.make_optimizer(4)
    state = tx.init(params)
    moments = [np.shape(x) for x in jax.tree.leaves(state)]
    student_leaves = len(jax.tree.leaves(params["student"]))
    assert sum(1 for s in moments if s == (2,)) == 2 * student_leaves  # Adam mu and nu for the student only
    _, state = tx.update(grads, state, params)  # step 0: lr 0 (warmup starts at 0)
    updates, _ = tx.update(grads, state, params)  # step 1: Adam direction 1 for constant unit gradients
    for side in ("teacher",):
        assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates[side]))
    assert float(updates["center"].sum()) == 0 and float(updates["teacher_temp"]) == 0
    lr = 4e-3 * math.sqrt(4 / 1024)  # tiny: batch 4, sqrt scaling; warmup linspace(0, lr, 2)[1] = lr
    assert float(lr_fn(1)) == pytest.approx(lr)
    wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 1 / 4))  # cosine 0.04 -> 0.4 over 4 steps, at step 1
    u = jax.tree.map(lambda a: float(a[0]), updates["student"])
    b, h = u["backbone"], u["dino_head"]
    # rel 1e-4: Adam's float32 bias correction 1 - 0.999^t (torch computes it in float64)
    expect = lambda mult, decay: pytest.approx(-lr * mult * (1 + decay * wd * 0.5), rel=1e-4)  # noqa: E731
    assert b["patch_embed"]["proj"]["kernel"] == expect(0.9 ** 3 * 0.2, 1)  # depth 2: embeddings 0.9^3
    assert b["patch_embed"]["proj"]["bias"] == expect(0.9 ** 3 * 0.2, 0)
    assert b["pos_embed"] == expect(0.9 ** 3, 1) and b["cls_token"] == expect(0.9 ** 3, 1)
    assert b["blocks_0"]["attn"]["query"]["kernel"] == expect(0.9 ** 2, 1)
    assert b["blocks_0"]["norm1"]["scale"] == expect(0.9 ** 2, 0) and b["blocks_0"]["ls1"] == expect(0.9 ** 2, 0)
    assert b["blocks_1"]["mlp"]["fc1"]["kernel"] == expect(0.9, 1) and b["blocks_1"]["mlp"]["fc1"]["bias"] == expect(0.9, 0)
    assert b["norm"]["scale"] == expect(1.0, 0)
    assert h["mlp_0"]["kernel"] == expect(1.0, 1) and h["mlp_0"]["bias"] == expect(1.0, 0)
    assert h["last_layer"]["kernel"] == 0.0  # frozen for the first epoch (tiny: 2 steps)


def test_clip_per_submodule():
    clip = optim_lib.clip_by_norm(1.0, depth=2)
    grads = {"student": {"backbone": {"a": jnp.array([3.0, 4.0])}, "dino_head": {"b": jnp.array([0.3, 0.4])}}}
    out, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(np.asarray(out["student"]["backbone"]["a"]), [0.6, 0.8], rtol=1e-5)  # norm 5 -> 1
    np.testing.assert_allclose(np.asarray(out["student"]["dino_head"]["b"]), [0.3, 0.4], rtol=1e-6)  # under 1: kept
    chained = optax.multi_transform({"s": clip, "f": optax.set_to_zero()}, {"student": {"backbone": {"a": "s"},
                                                                                        "dino_head": {"b": "f"}}})
    out, _ = chained.update(grads, chained.init(grads), grads)  # masked leaves are skipped by the clip
    np.testing.assert_allclose(np.asarray(out["student"]["backbone"]["a"]), [0.6, 0.8], rtol=1e-5)


def test_load_pretrained_puts_uni_weights_into_both_backbones(task):
    net = lambda: {"backbone": {"pos_embed": np.zeros((1, 5, 4), np.float32), "mask_token": np.zeros((1, 4), np.float32)},  # noqa: E731
                   "dino_head": {"mlp_0": {"bias": np.zeros(3, np.float32)}}}
    params = {"student": net(), "teacher": net(), "teacher_temp": np.float32(0.04)}
    uni = {"encoder": {"pos_embed": np.ones((1, 5, 4), np.float32)}}  # medjax.convert.uni params (no mask token)
    for pretrained in (uni, {"params": uni}):
        loaded = task.load_pretrained(params, pretrained)
        for side in ("student", "teacher"):
            np.testing.assert_array_equal(loaded[side]["backbone"]["pos_embed"], 1.0)
            np.testing.assert_array_equal(loaded[side]["backbone"]["mask_token"], 0.0)  # kept from init
    run = {"student": net(), "teacher": {**net(), "dino_head": {"mlp_0": {"bias": np.full(3, 2.0, np.float32)}}}}
    np.testing.assert_array_equal(task.load_pretrained(params, run)["teacher"]["dino_head"]["mlp_0"]["bias"], 2.0)
