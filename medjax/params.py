"""Param-tree helpers shared by the trainer, the optimizer and the tasks: path names and merging a
pretrained tree into a freshly initialised one."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.transformer_layout import match_layer_layout


def path_string(path) -> str:
    """A tree path as "a/b/c" (dict keys, attribute names or sequence indices)."""
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def merge_params(params: Any, source: Any) -> tuple[Any, list[str]]:
    """`params` with each leaf replaced by `source`'s leaf at the same path when the shapes agree;
    also the paths that could not be taken (missing, or of another shape), described. Layer stacks are
    first brought to `params`' layout (`blocks_0, ...` unrolled or one scanned `blocks`, stacked on axis 0),
    so e.g. an unrolled pretraining run initialises a scanned fine-tuning model."""
    source = match_layer_layout(source, params)
    skipped = []

    def take(path, leaf):
        node, name = source, path_string(path)
        for p in path:
            key = getattr(p, "key", None)
            if not isinstance(node, dict) or key not in node:
                skipped.append(f"{name} (missing)")
                return leaf
            node = node[key]
        if np.shape(node) != leaf.shape:
            skipped.append(f"{name} (shape {np.shape(node)} vs {leaf.shape})")
            return leaf
        return jnp.asarray(node, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, params), skipped
