"""medjax: medical vision-language models in JAX/Flax, sharded over a jax.sharding.Mesh."""

__version__ = "0.1.0"
