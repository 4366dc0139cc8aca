"""Compute dtypes named in configs ("float32", "bfloat16", "float16"), parsed in one place."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: Any, where: str) -> Any:
    """"float32" / "bfloat16" / "float16" -> the jnp dtype; `where` names the config field."""
    if name not in _DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]
