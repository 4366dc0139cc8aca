"""Self-normalising networks (Klambauer et al., NeurIPS 2017): Dense -> SELU -> AlphaDropout.

LeCun-normal weights (Sec. 3, "weights with E(w)=0, Var(w)=1/n") keep activations at zero mean,
unit variance through SELU; alpha dropout (Sec. 4) drops to SELU's negative saturation value and
applies an affine correction so that mean and variance are preserved.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# SELU constants (Klambauer et al. Eq. 2); alpha' = -lambda * alpha is SELU's limit for x -> -inf.
SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805
ALPHA_PRIME = -SELU_SCALE * SELU_ALPHA  # -1.7580993408473766


class AlphaDropout(nn.Module):
    """Alpha dropout (Klambauer et al. Sec. 4, "Alpha-dropout").

    Each unit is kept with probability q = 1 - rate, else set to alpha'; then y = a x' + b with
    a = (q + alpha'^2 q (1 - q))^(-1/2) and b = -a (1 - q) alpha', so zero-mean unit-variance
    inputs keep mean 0 and variance 1. Identity when `train` is False or rate is 0. Uses the
    'dropout' rng.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"medjax/nn/snn.py AlphaDropout.rate must be in [0, 1), got {self.rate}")
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        a = (keep + ALPHA_PRIME ** 2 * keep * self.rate) ** -0.5
        b = -a * self.rate * ALPHA_PRIME
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return (a * jnp.where(kept, x, ALPHA_PRIME) + b).astype(x.dtype)


class SNNLayer(nn.Module):
    """Dense (LeCun-normal init) -> SELU -> AlphaDropout; kernel logical axes `kernel_axes`."""

    features: int
    dropout_rate: float = 0.0
    kernel_axes: tuple[str, str] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[1:]),
                     name="dense")(x)
        x = nn.selu(x)
        return AlphaDropout(self.dropout_rate, name="alpha_dropout")(x, train=train)


class SNN(nn.Module):
    """A stack of `SNNLayer`s with output widths `features` (applied over the last axis)."""

    features: Sequence[int]
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not self.features:
            raise ValueError("medjax/nn/snn.py SNN.features must name at least one layer width")
        for i, width in enumerate(self.features):
            x = SNNLayer(width, self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"layer_{i}")(x, train=train)
        return x
