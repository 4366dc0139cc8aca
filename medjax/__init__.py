"""medjax: medical vision-language models in JAX/Flax, sharded over a jax.sharding.Mesh."""

__version__ = "0.1.0"

import os as _os

# medjax uses transformers for tokenizers only (and PyTorch, where installed, for parity and conversion):
# its "PyTorch was not found. Models won't be available ..." notice says nothing to a medjax user (issue #23).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
