"""The task contract (DESIGN.md): the only thing the trainer knows about a model family."""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import flax.linen as nn
import grain
import jax

Batch = Mapping[str, Any]


def model_config(config):
    """The experiment's `model` block plus the run-wide compute dtype and kernel implementation (what the
    model builders of several families take)."""
    cfg = config.model.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.dtype = config.dtype
        cfg.kernel_impl = config.kernels.impl
    return cfg


class Task(Protocol):
    model: nn.Module

    def init_batch(self) -> Batch:
        """A global batch of the right shapes/dtypes (numpy), for init and tracing."""

    def init_params(self, rng: jax.Array) -> Any:
        """Params as boxed `nn.Partitioned` leaves (logical axis names), from `init_batch()`."""

    def loss_fn(self, params: Any, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """(scalar loss, dict of scalar metrics) on a global batch."""

    def train_data(self) -> grain.IterDataset:
        """This process's share of each global batch, checkpointable."""

    def evaluate(self, params: Any) -> dict[str, float]:
        """The paper's metrics on the evaluation split."""

    def load_pretrained(self, params: Any, pretrained: Any) -> Any:
        """Params with the parts found in `pretrained` (e.g. a pretraining run's params) put in."""


class OptionalTaskHooks(Protocol):
    """Methods a task may define; the trainer and `python -m medjax.evaluate` use them when present."""

    def make_optimizer(self, total_steps: int) -> tuple[Any, Any]:
        """(optax transformation, lr schedule) instead of medjax.optim's AdamW, e.g. layer-wise lr decay
        or a frozen teacher (optax.multi_transform with set_to_zero)."""

    def post_update(self, params: Any, metrics: dict, step: jax.Array) -> tuple[Any, dict]:
        """Inside the jitted step, after the optimizer update: e.g. an EMA teacher or running centers.
        `metrics` is what loss_fn returned (averaged over microbatches); non-scalar entries it consumes
        must be removed, so the returned metrics are scalars."""

    def initial_params(self, params: Any) -> Any:
        """Params for a run starting from scratch (no checkpoint, no `init=`), e.g. with towers loaded from
        converted Hugging Face weights the config names. Gets the freshly created (sharded) params; returns
        them unchanged (the same object: nothing to load, nothing copied to the host) or a new tree whose
        replaced parts may be host arrays (the trainer places them with the params' shardings)."""

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """A markdown table in the paper's layout, one column group per evaluated checkpoint."""
