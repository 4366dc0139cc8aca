"""The generic trainer on a toy task: exact resume, sharding, NaN stop, checkpoints, metrics."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.checkpoint import restore_params
from medjax.trainer import NonFiniteLossError, Trainer
from tests.toy_task import ToyTask, toy_config


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def run(workdir, **train):
    config = toy_config(**train)
    return Trainer(config, ToyTask(config), str(workdir)).run(), config


def test_restart_is_bitwise_identical(tmp_path):
    full, _ = run(tmp_path / "full", steps=6)
    first, _ = run(tmp_path / "split", steps=6, stop_at=3)
    assert first["step"] == 3
    second, _ = run(tmp_path / "split", steps=6)
    assert second["step"] == 6 and len(second["losses"]) == 3
    assert full["losses"] == first["losses"] + second["losses"]  # bitwise: float equality
    a, b = restore_params(str(tmp_path / "full")), restore_params(str(tmp_path / "split"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    logged = read_losses(tmp_path / "split")
    assert sorted(logged) == list(range(1, 7))
    assert [logged[s] for s in range(1, 7)] == full["losses"]


def test_larger_steps_continues_from_checkpoint(tmp_path):
    run(tmp_path, steps=4)
    result, _ = run(tmp_path, steps=6)
    assert result["step"] == 6 and len(result["losses"]) == 2


def test_sharded_run_equals_single_device(tmp_path):
    assert jax.device_count() == 8
    single, _ = run(tmp_path / "one", steps=4, batch_size=8)
    config = toy_config(steps=4)
    config.mesh.update(dict(data=4, fsdp=2))
    trainer = Trainer(config, ToyTask(config), str(tmp_path / "eight"))
    kernel = trainer.state["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    sharded = trainer.run()
    config1 = toy_config(steps=4)
    config1.mesh.num_devices = 1
    one = Trainer(config1, ToyTask(config1), str(tmp_path / "one1")).run()
    np.testing.assert_allclose(sharded["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(single["losses"], one["losses"], rtol=1e-5)


def test_grad_accumulation_matches_full_batch(tmp_path):
    config = toy_config(steps=3)
    config.data.shuffle = False
    config.mesh.num_devices = 1
    full = Trainer(config, ToyTask(config), str(tmp_path / "a")).run()
    config.train.grad_accum = 2
    accum = Trainer(config, ToyTask(config), str(tmp_path / "b")).run()
    # Dropout draws differ per microbatch, so compare loosely; the first step's loss is pre-update.
    assert abs(full["losses"][0] - accum["losses"][0]) / full["losses"][0] < 0.05
    assert accum["losses"][-1] < accum["losses"][0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(steps=6, checkpoint_every=2)
    config.data.update(dict(poison=8 * 3 + 1, shuffle=False))  # an example of the 4th batch
    trainer = Trainer(config, ToyTask(config), str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="at step 4.*step 2"):
        trainer.run()
    assert trainer.checkpointer.latest_step() == 2
    assert sorted(read_losses(tmp_path)) == [1, 2, 3]


def test_batch_must_divide_over_devices(tmp_path):
    config = toy_config(batch_size=6)
    with pytest.raises(ValueError, match="batch_size=6 does not divide over 8"):
        Trainer(config, ToyTask(config), str(tmp_path))


def test_metrics_files(tmp_path):
    run(tmp_path, steps=2)
    with open(tmp_path / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    for key in ("step", "loss", "mse", "grad_norm", "lr", "examples_per_sec"):
        assert key in first
    assert os.listdir(tmp_path / "tensorboard")


class HookedToyTask(ToyTask):
    """The optional hooks: plain SGD from the task, and a post-update EMA copy of the params fed by a
    non-scalar metric that post_update consumes."""

    def init_params(self, rng):
        params = super().init_params(rng)
        return {"net": params, "ema": jax.tree.map(lambda p: p, params), "seen": jnp.zeros((2,))}

    def loss_fn(self, params, batch, rng, train):
        mse, metrics = super().loss_fn(params["net"], batch, rng, train)
        return mse, dict(metrics, batch_x_mean=jnp.mean(batch["x"][:, :2], axis=0))

    def make_optimizer(self, total_steps):
        self.optimizer_calls = total_steps
        frozen = lambda p: {"net": "train", "ema": "freeze", "seen": "freeze"}
        tx = optax.multi_transform({"train": optax.sgd(0.05), "freeze": optax.set_to_zero()}, frozen)
        return tx, optax.constant_schedule(0.05)

    def post_update(self, params, metrics, step):
        metrics = dict(metrics)
        seen = metrics.pop("batch_x_mean")
        ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, params["ema"], params["net"])
        return dict(params, ema=ema, seen=params["seen"] + seen), metrics


def test_task_hooks_optimizer_and_post_update(tmp_path):
    config = toy_config(steps=2, checkpoint_every=100)
    config.mesh.num_devices = 1
    task = HookedToyTask(config)
    trainer = Trainer(config, task, str(tmp_path / "hooks"))
    assert task.optimizer_calls == 2
    before = jax.device_get(trainer.state["params"])
    trainer.run()
    after = jax.device_get(trainer.state["params"])
    net0, ema0 = before["net"]["Dense_0"]["kernel"], before["ema"]["Dense_0"]["kernel"]
    net2, ema2 = after["net"]["Dense_0"]["kernel"], after["ema"]["Dense_0"]["kernel"]
    assert not np.allclose(net0, net2)  # SGD moved the trained subtree
    assert not np.allclose(ema0, ema2) and not np.allclose(ema2, net2)  # EMA follows, lagging
    assert float(np.abs(after["seen"]).sum()) > 0  # the consumed metric reached the params
    rows = read_losses(str(tmp_path / "hooks"))
    assert len(rows) == 2


class InitialParamsToyTask(ToyTask):
    """initial_params replaces one kernel by host ones (as a converted tower would) and leaves the rest."""

    def initial_params(self, params):
        kernel = params["Dense_1"]["kernel"]
        return dict(params, Dense_1=dict(params["Dense_1"], kernel=np.ones(kernel.shape, np.float32)))


def test_initial_params_hook_places_the_returned_parts(tmp_path):
    config = toy_config(steps=1, checkpoint_every=100)
    config.mesh.num_devices = 1
    trainer = Trainer(config, InitialParamsToyTask(config), str(tmp_path / "initial"))
    message = trainer.restore_or_init(iter(trainer.task.train_data()))
    assert "initial_params" in message
    kernel = trainer.state["params"]["Dense_1"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding == trainer.state_shardings["params"]["Dense_1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), 1.0)
    plain = Trainer(config, ToyTask(config), str(tmp_path / "plain"))
    assert plain.restore_or_init(iter(plain.task.train_data())) == "initialised from scratch"
