"""The MAE baseline (mrm_mae_baseline): MAE's random masking keeps exactly 25% of the patches per image, the loss
is the masked-patch MSE by hand, two steps lower nothing that is frozen, and the encoder loads into mrm_aptos."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from medjax import config as config_lib
from medjax.nn.vit import patchify
from medjax.tasks import build_task


@pytest.fixture(scope="module")
def mae(fundus_demo):
    config = config_lib.get_config("mrm_mae_baseline", "tiny", [f"data.dir={fundus_demo}"])
    task = build_task(config, log=lambda *_: None)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    return task, params


def test_masking_and_loss_by_hand(mae):
    task, params = mae
    batch = next(iter(task.train_data()))
    masking_rng, _ = jax.random.split(jax.random.PRNGKey(7))  # loss_fn's split of its rng
    out = jax.jit(lambda p, x: task.model.apply({"params": p}, x, train=False, rngs={"masking": masking_rng}))(
        params, batch["image"])
    loss = jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.PRNGKey(7), False)[0])(params, batch)
    m = task.config.model
    n = (m.image_size // m.patch_size) ** 2
    mask = np.asarray(out["mask"])
    np.testing.assert_array_equal(mask.sum(1), n - int(n * 0.25))  # 75% masked in every image
    assert len({tuple(r) for r in mask}) > 1  # a different draw per image
    target = np.asarray(patchify(batch["image"], m.patch_size))
    if m.norm_pix_loss:  # MAE's per-patch normalised target (off by default: the authors' main_pretrain.py)
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(out["pred"]) - target) ** 2).mean(-1)
    assert float(loss) == pytest.approx(float((per_patch * mask).sum() / mask.sum()), rel=1e-5)


def test_two_steps_and_transfer(mae, fundus_demo):
    task, params = mae
    tx, _ = task.make_optimizer(int(task.config.train.steps))
    state, data, losses, new = tx.init(params), iter(task.train_data()), [], params
    step = jax.jit(lambda p, s, b, r: _step(task, tx, p, s, b, r))
    for i in range(2):
        new, state, loss = step(new, state, next(data), jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    np.testing.assert_array_equal(new["image_encoder"]["pos_embed"], params["image_encoder"]["pos_embed"])  # fixed
    assert np.any(np.asarray(new["decoder_pred"]["kernel"]) != np.asarray(params["decoder_pred"]["kernel"]))
    aptos = build_task(config_lib.get_config("mrm_aptos", "tiny", [f"data.dir={fundus_demo}/aptos"]), log=lambda *_: None)
    fine = nn.meta.unbox(jax.eval_shape(aptos.init_params, jax.random.PRNGKey(0)))
    fine = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fine)
    merged = aptos.load_pretrained(fine, jax.device_get(new))
    np.testing.assert_array_equal(merged["encoder"]["pos_embed"], new["image_encoder"]["pos_embed"])


def _step(task, tx, params, state, batch, rng):
    (loss, _), grads = jax.value_and_grad(lambda p: task.loss_fn(p, batch, rng, True), has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
