"""Orbax checkpoints holding two items: `state` (params, optimizer state, step, RNG) and `data`
(the Grain iterator), so a resumed run sees exactly the same batches (DESIGN style rule 7)."""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every `interval` steps, keep the last `keep`, asynchronously; restore the latest."""

    def __init__(self, workdir: str, *, interval: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(interval), 1), max_to_keep=int(keep), create=True,
            enable_async_checkpointing=async_save,
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


def restore_params(path: str) -> Any:
    """Params (host numpy arrays) from a training workdir's latest checkpoint, or from a checkpoint
    step directory; used for `init=` (pretrained weights) and evaluation."""
    path = os.path.abspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{root} holds no checkpoint")
    metadata = manager.item_metadata(step)["state"]
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        metadata,
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    manager.close()
    return jax.device_get(restored["state"]["params"])
