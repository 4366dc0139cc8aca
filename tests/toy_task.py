"""A small Task for trainer tests: dropout-regularised linear regression with logical axes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments._common import base_config
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.tasks.base import TaskBase


class ToyModel(nn.Module):
    hidden: int = 16

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        h = nn.Dropout(0.1, deterministic=not train)(nn.gelu(h))
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(h)[..., 0]


def toy_config(**train) -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "toy"
    c.variant = "tiny"
    c.train.update(dict(steps=6, batch_size=8, log_every=1, checkpoint_every=2, keep_checkpoints=10), **train)
    c.optim.update(dict(lr=1e-2, warmup_steps=1))
    c.data = ml_collections.ConfigDict(dict(size=64, features=8, poison=-1, shuffle=True))
    return c


class ToyTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        d = config.data
        rng = np.random.default_rng(0)
        x = rng.normal(size=(d.size, d.features)).astype(np.float32)
        y = (x @ rng.normal(size=d.features)).astype(np.float32)
        if d.poison >= 0:
            x[d.poison] = np.nan
        self.examples = [{"x": x[i], "y": y[i]} for i in range(d.size)]
        self.model = ToyModel()

    def init_batch(self):
        return {"x": np.zeros((2, self.config.data.features), np.float32), "y": np.zeros((2,), np.float32)}

    def init_params(self, rng):
        return self.model.init(rng, self.init_batch()["x"], train=False)["params"]

    def loss_fn(self, params, batch, rng, train):
        pred = self.model.apply({"params": params}, batch["x"], train=train, rngs={"dropout": rng})
        mse = jnp.mean((pred - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def train_data(self):
        noise = lambda ex, rng: {"x": ex["x"] + np.float32(0.01) * rng.standard_normal(ex["x"].shape, np.float32), "y": ex["y"]}
        return global_batch_dataset(self.examples, global_batch=self.global_batch,
                                    seed=int(self.config.seed), transform=noise, shuffle=self.config.data.shuffle,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    def evaluate(self, params):
        x = np.stack([e["x"] for e in self.examples])
        y = np.stack([e["y"] for e in self.examples])
        return {"mse": float(jnp.mean((self.model.apply({"params": params}, x, train=False) - y) ** 2))}

    def load_pretrained(self, params, pretrained):
        return pretrained
