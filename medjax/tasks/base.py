"""The task contract (DESIGN.md): the only thing the trainer knows about a model family."""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import flax.linen as nn
import grain
import jax

Batch = Mapping[str, Any]


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
