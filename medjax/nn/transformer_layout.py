"""Moving params between the two layouts of a `medjax.nn.transformer` layer stack.

A stack of `depth` blocks is either unrolled (submodules `blocks_0`, `blocks_1`, ...) or one `nn.scan` over
the layers (submodule `blocks`, every param with a leading layer axis of logical name "layers",
`medjax/parallel/rules.py`). Checkpoints and converters speak the unrolled layout; deep models train scanned.

- `stack_layers` / `unstack_layers`: unrolled -> scanned and back, keeping logical-axis boxes;
- `match_layer_layout`: one tree brought to another's layout, so a merge by path works across layouts;
- `unrolled_shapes`: a model's param shapes in the unrolled layout (what converters map onto);
- `layer_count`, `layer_intermediates`: the depth of a stack and the values its blocks sowed, in either layout.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS = "layers"  # logical name of the stacked layer axis of scanned params (medjax/parallel/rules.py)
SCAN_NAME = "blocks"  # the scanned stack's submodule; unrolled blocks are f"{SCAN_NAME}_{i}"


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _value(leaf):
    if isinstance(leaf, nn.Partitioned):
        return leaf.unbox(apply_constraint=False)
    return leaf.unbox() if _is_box(leaf) else leaf


def _layer_keys(node: dict, name: str) -> list[str]:
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    found = sorted((int(m.group(1)), k) for k in node if (m := pattern.fullmatch(str(k))))
    if [i for i, _ in found] != list(range(len(found))):
        raise ValueError(f"medjax/nn/transformer_layout.py: layers {[k for _, k in found]} are not {name}_0..{name}_N")
    return [k for _, k in found]


def _stack(trees: list) -> Any:
    def one(*leaves):
        if _is_box(leaves[0]):
            value = jnp.stack([_value(leaf) for leaf in leaves])
            return leaves[0].replace_boxed(value).add_axis(0, {nn.PARTITION_NAME: LAYERS}) \
                if hasattr(leaves[0], "add_axis") else leaves[0].replace_boxed(value)
        return jnp.stack([jnp.asarray(leaf) for leaf in leaves])
    return jax.tree.map(one, *trees, is_leaf=_is_box)


def _unstack(tree: Any, depth: int) -> list:
    def one(leaf, i):
        if _is_box(leaf):
            removed = leaf.remove_axis(0, {nn.PARTITION_NAME: LAYERS}) if hasattr(leaf, "remove_axis") else leaf
            return removed.replace_boxed(_value(leaf)[i])
        return leaf[i]
    return [jax.tree.map(lambda leaf, i=i: one(leaf, i), tree, is_leaf=_is_box) for i in range(depth)]


def _rebuild(tree: Any, fn, name: str) -> Any:
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    node = {k: _rebuild(v, fn, name) for k, v in tree.items()}
    return fn(node, name)


def _stack_node(node: dict, name: str) -> dict:
    keys = _layer_keys(node, name)
    if not keys:
        return node
    if name in node:
        raise ValueError(f"medjax/nn/transformer_layout.py stack_layers: both {name!r} and {keys[0]!r} present")
    out = {k: v for k, v in node.items() if k not in keys}
    out[name] = _stack([node[k] for k in keys])
    return out


def _unstack_node(node: dict, name: str) -> dict:
    if name not in node or not isinstance(node[name], dict):
        return node
    leaves = jax.tree.leaves(node[name], is_leaf=_is_box)
    depth = _value(leaves[0]).shape[0]
    out = {k: v for k, v in node.items() if k != name}
    out.update({f"{name}_{i}": layer for i, layer in enumerate(_unstack(node[name], depth))})
    return out


def stack_layers(params: Any, name: str = SCAN_NAME) -> Any:
    """Unrolled -> scanned layout: wherever a dict holds `name_0`, ..., `name_{n-1}`, they become one
    `name` entry whose leaves are stacked on a new axis 0 (boxed params get the logical axis "layers")."""
    return _rebuild(params, _stack_node, name)


def unstack_layers(params: Any, name: str = SCAN_NAME) -> Any:
    """Scanned -> unrolled layout: every `name` dict entry with stacked leaves becomes `name_0`, ...."""
    return _rebuild(params, _unstack_node, name)


def match_layer_layout(source: Any, target: Any, name: str = SCAN_NAME) -> Any:
    """`source` with its layer stacks stacked or unstacked to the layout of `target` (both param trees), so
    a merge by path works between a scanned and an unrolled model of the same architecture."""
    if not isinstance(source, dict) or not hasattr(target, "items"):
        return source
    target_keys = set(target.keys())
    if name in target_keys and name not in source and f"{name}_0" in source:
        source = _stack_node(dict(source), name)
    elif name not in target_keys and f"{name}_0" in target_keys and isinstance(source.get(name), dict):
        source = _unstack_node(dict(source), name)
    return {k: (match_layer_layout(v, target[k], name) if k in target_keys else v) for k, v in source.items()}


def unrolled_shapes(shapes: Mapping[tuple[str, ...], tuple[int, ...]], name: str = SCAN_NAME
                    ) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat param path -> shape of a model in either layout -> those of its unrolled layout: a path through a
    scanned stack `name` (leading layer axis of size n) becomes the n paths through `name_0`, ...,
    `name_{n-1}` without that axis. What a converter maps checkpoint layers onto before `match_layer_layout`
    (or `stack_layers`) brings the converted params to the model's layout."""
    out = {}
    for path, shape in shapes.items():
        if name not in path:
            out[path] = tuple(shape)
            continue
        at = path.index(name)
        for i in range(shape[0]):
            out[path[:at] + (f"{name}_{i}",) + path[at + 1:]] = tuple(shape[1:])
    return out


def layer_count(params: dict, name: str = SCAN_NAME) -> int:
    """Number of layers of a stack in either layout (`params` holds `name` or `name_0`, ...)."""
    if name in params:
        leaf = jax.tree.leaves(params[name], is_leaf=_is_box)[0]
        return int(_value(leaf).shape[0])
    return len(_layer_keys(params, name))


def _sown_value(node: Any, key: str) -> jax.Array | None:
    """The value sowed under `key` anywhere below `node` (flax keeps sowed values as a 1-tuple)."""
    if not hasattr(node, "items"):
        return None
    for k, v in node.items():
        if k == key:
            return v[0] if isinstance(v, tuple) else v
        found = _sown_value(v, key)
        if found is not None:
            return found
    return None


def layer_intermediates(intermediates: Any, key: str, name: str = SCAN_NAME) -> jax.Array:
    """The values every block of a stack sowed under `key` (e.g. "query_logits"), stacked (depth, ...): from
    the scanned `name` entry (already stacked by nn.scan) or from `name_0`, `name_1`, ... in layer order.
    `intermediates` is the "intermediates" collection of an apply with mutable=["intermediates"]; it must
    hold exactly one stack."""
    stacks = []

    def walk(node):
        if not hasattr(node, "items"):
            return
        if name in node and hasattr(node[name], "items"):
            stacks.append(_sown_value(node[name], key))
            return
        keys = _layer_keys(node, name)
        if keys:
            stacks.append(jnp.stack([_sown_value(node[k], key) for k in keys]))
            return
        for value in node.values():
            walk(value)
    walk(intermediates)
    if len(stacks) != 1 or stacks[0] is None:
        raise ValueError(f"medjax/nn/transformer_layout.py layer_intermediates: expected one layer stack {name!r} that "
                         f"sowed {key!r}, found {len(stacks)} (was the model applied with mutable=['intermediates'] "
                         f"and the sowing switch on?)")
    return stacks[0]
