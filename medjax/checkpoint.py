"""Orbax checkpoints holding two items: `state` (params, optimizer state, step, RNG) and `data`
(the Grain iterator), so a resumed run sees exactly the same batches (DESIGN style rule 7)."""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medjax.nn.transformer import match_layer_layout


class Checkpointer:
    """Save every `interval` steps, keep the last `keep`, asynchronously; restore the latest."""

    def __init__(self, workdir: str, *, interval: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        # Only every `interval` steps (plus forced saves): Orbax's default policy would also save
        # the first step of every run and resume.
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(max(int(interval), 1))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), create=True, enable_async_checkpointing=async_save,
            save_decision_policy=policy,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, data_iterator, step: int | None = None) -> Any:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying shardings) and the iterator in place."""
        step = self.manager.latest_step() if step is None else step
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params: Any) -> str:
    """Write a params tree (e.g. converted PyTorch weights) as `<path>/state` holding {"params": ...}, the
    layout of one training checkpoint step, so `restore_params(path)`, `init=path`, `--params path` and
    `python -m medjax.evaluate --checkpoint path` all read it. Refuses to overwrite an existing one."""
    path = os.path.abspath(path)
    item = os.path.join(path, "state")
    if os.path.exists(item):
        raise FileExistsError(f"{item} already exists; choose another --out directory or remove it")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(item, {"params": jax.tree.map(np.asarray, params)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def restore_params(path: str) -> Any:
    """Params (host numpy arrays) from a training workdir's latest checkpoint, or from a checkpoint
    step directory; used for `init=` (pretrained weights) and evaluation. Works whatever devices or
    processes wrote it: every array is restored onto this process's first device."""
    path = os.path.abspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if os.path.isdir(os.path.join(root, "state")):  # a step directory itself
        item = os.path.join(root, "state")
    else:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no checkpoint directory at {path}")
        steps = sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
        if not steps:
            raise FileNotFoundError(f"{root} holds no checkpoint")
        item = os.path.join(root, str(steps[-1]), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(item)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = checkpointer.restore(item, abstract)
    checkpointer.close()
    return jax.device_get(restored["params"])


def merge_params(params: Any, source: Any) -> tuple[Any, list[str]]:
    """`params` with each leaf replaced by `source`'s leaf at the same path when the shapes agree;
    also the paths that could not be taken (missing, or of another shape), described. Layer stacks are
    first brought to `params`' layout (`blocks_0, ...` unrolled or one scanned `blocks`, stacked on axis 0),
    so e.g. an unrolled pretraining run initialises a scanned fine-tuning model."""
    source = match_layer_layout(source, params)
    skipped = []

    def take(path, leaf):
        node, name = source, "/".join(str(getattr(p, "key", p)) for p in path)
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
