"""Orbax checkpoints holding two items: `state` (params, optimizer state, step, RNG) and `data`
(the Grain iterator), so a resumed run sees exactly the same batches (DESIGN style rule 7).

Each finished step also holds `medjax_checksums.json` (medjax.checkpoint_integrity) and
`medjax_provenance.json` (medjax.provenance). A restore verifies the checksums and falls back to the newest
step that verifies and restores, moving each skipped step to `<workdir>/skipped_checkpoints/` and saying
which and why (issue #15: a corrupted step restored silently; an emptied one blocked resuming)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax import checkpoint_integrity as integrity
from medjax import provenance as provenance_lib
from medjax.errors import InputFileNotFoundError
from medjax.params import merge_params  # noqa: F401  (re-exported; its home is medjax.params)


class CheckpointError(RuntimeError):
    """No checkpoint step of a directory verifies and restores."""


def _agree_on(value: int) -> int:
    """Process 0's value, on every process (a multi-process run must restore the same step)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


class Checkpointer:
    """Save every `interval` steps, keep the last `keep`, asynchronously; restore the newest step that
    verifies. `log` receives one line when a save starts and one when it has finished."""

    def __init__(self, workdir: str, *, interval: int, keep: int, async_save: bool = True,
                 provenance: dict | None = None, log: Callable[[str], None] | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.skipped_directory = os.path.join(os.path.abspath(workdir), "skipped_checkpoints")
        # Only every `interval` steps (plus forced saves): Orbax's default policy would also save
        # the first step of every run and resume.
        self.interval = max(int(interval), 1)
        self.provenance = provenance
        self.log = log or (lambda message: None)
        self._unsealed: list[int] = []  # saved steps whose checksums are not recorded yet
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(self.interval)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), create=True, enable_async_checkpointing=async_save,
            save_decision_policy=policy,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def will_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, force=force)` writes a checkpoint (the interval policy, never twice)."""
        return (force or step % self.interval == 0) and self.latest_step() != step

    def save(self, step: int, state: Any, data_iterator, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        # Orbax's save waits for the previous save to finish first: those steps are complete now.
        self._seal([s for s in self._unsealed if s != step])
        if saved:
            self._unsealed.append(step)
            self.log(f"checkpoint: saving step {step} to {self.step_dir(step)}")
            if not self.manager.is_saving_in_progress():  # a synchronous save
                self._seal([step])
        return saved

    def seal_finished(self) -> None:
        """Record the checksums of saves that have finished in the background (cheap when none has)."""
        if self._unsealed and not self.manager.is_saving_in_progress():
            self._seal(list(self._unsealed))

    def _seal(self, steps: list[int]) -> None:
        for step in steps:
            self._unsealed.remove(step)
            if jax.process_index() != 0 or not os.path.isdir(self.step_dir(step)):
                continue  # written by process 0 only; a step already deleted by keep-N needs none
            if self.provenance is not None:
                provenance_lib.write_record(self.step_dir(step), self.provenance)
            count = integrity.record_checksums(self.step_dir(step))
            self.log(f"checkpoint: step {step} saved ({count} files, checksums recorded)")

    # ----- restore: the newest step that verifies -----
    def _problem(self, step: int) -> str | None:
        """Why step `step` cannot be trusted, or None (a step without checksums passes, with a warning)."""
        step_dir = self.step_dir(step)
        if not integrity.has_checksums(step_dir):
            if not os.path.isdir(os.path.join(step_dir, "state")):
                return f"{step_dir} has no state item (emptied or partial)"
            self.log(f"checkpoint: step {step} has no {integrity.CHECKSUMS} (saved by an older medjax, or the "
                     "run stopped before recording it): restoring it unverified")
            return None
        return integrity.verify_checksums(step_dir)

    def skip(self, step: int, reason: str) -> None:
        """Move step `step` aside (never deleted: it may be inspected) and forget it."""
        if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
            os.makedirs(self.skipped_directory, exist_ok=True)
            target, n = os.path.join(self.skipped_directory, str(step)), 1
            while os.path.exists(target):
                target, n = os.path.join(self.skipped_directory, f"{step}.{n}"), n + 1
            shutil.move(self.step_dir(step), target)
            reason += f"; moved to {target}"
        self.log(f"checkpoint: skipping step {step}: {reason}")
        self.manager.reload()

    def newest_verified_step(self) -> int | None:
        """The newest step whose checksums verify; newer ones are skipped. Process 0 decides (and moves
        steps) for all: its broadcast is also the barrier after which the others re-read the directory."""
        chosen = -1
        if jax.process_index() == 0:
            for step in sorted(self.manager.all_steps(), reverse=True):
                problem = self._problem(step)
                if problem is None:
                    chosen = step
                    break
                self.skip(step, problem)
        chosen = _agree_on(chosen)
        if jax.process_index() != 0:
            self.manager.reload()
        return None if chosen < 0 else chosen

    def restore(self, abstract_state: Any, data_iterator, step: int | None = None) -> Any:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying shardings) and the iterator in place:
        step `step`, or the newest step that verifies and restores (skipping the others, said in `log`)."""
        explicit = step is not None
        while True:
            if explicit:
                problem = self._problem(step)
                if problem:
                    raise CheckpointError(f"checkpoint step {step} in {self.directory}: {problem}")
            else:
                step = self.newest_verified_step()
                if step is None:
                    raise CheckpointError(f"{self.directory}: no checkpoint step verifies (see the skipped "
                                          f"steps in {self.skipped_directory}); remove the directory to start over")
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as err:  # a step Orbax cannot read (no checksums to tell beforehand)
                if explicit or jax.process_count() > 1:
                    raise
                self.skip(step, f"Orbax could not restore it ({type(err).__name__}: {str(err)[:200]})")
                continue
            self.restored_step = step
            return restored["state"]

    def wait(self) -> None:
        """Wait for the background save; record the checksums of every finished step (also when the save
        failed: the steps finished before it are complete)."""
        try:
            self.manager.wait_until_finished()
        finally:
            self._seal(list(self._unsealed))

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self._seal(list(self._unsealed))
        finally:
            self.manager.close()


def finished_step(workdir: str, config) -> int | None:
    """The step of the newest checkpoint in `workdir` when it already reaches the run's end (`train.stop_at`
    or `train.steps`), verifies (checksums) and was written by this experiment, variant and model config; else
    None. A rerun of a finished run then stops at once instead of building, compiling and restoring (issue #23);
    anything less certain (no checksums, another config, a damaged step) goes the full way (`Trainer.run`)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True) \
        if os.path.isdir(directory) else []
    end = int(config.train.stop_at) or int(config.train.steps)
    if not steps or steps[0] < end:
        return None
    step_dir = os.path.join(directory, str(steps[0]))
    try:
        record = provenance_lib.read_record(step_dir)
    except provenance_lib.ProvenanceError:
        return None
    if record is None or not integrity.has_checksums(step_dir) or integrity.verify_checksums(step_dir):
        return None
    expected = json.loads(json.dumps(provenance_lib.run_record(config), sort_keys=True, default=str))
    same = all(record.get(k) == expected.get(k) for k in ("exp", "variant", "task", "model"))
    return steps[0] if same else None


def save_params(path: str, params: Any, provenance: dict | None = None) -> str:
    """Write a params tree (e.g. converted PyTorch weights) as `<path>/state` holding {"params": ...}, the
    layout of one training checkpoint step, so `restore_params(path)`, `init=path`, `--params path` and
    `python -m medjax.evaluate --checkpoint path` all read it; with its checksums and, given one, its
    provenance record (medjax.provenance). Refuses to overwrite an existing one."""
    path = os.path.abspath(path)
    item = os.path.join(path, "state")
    if os.path.exists(item):
        raise FileExistsError(f"{item} already exists; choose another --out directory or remove it")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(item, {"params": jax.tree.map(np.asarray, params)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    if provenance is not None:
        provenance_lib.write_record(path, provenance)
    integrity.record_checksums(path)
    return path


def params_dir(path: str, log: Callable[[str], None] | None = None) -> str:
    """The directory whose `state` item `restore_params(path)` reads: `path` itself when it is a step or
    params directory (refused if its checksums fail), else the newest step of a workdir's checkpoints whose
    checksums verify (`log` says which newer steps were passed over and why)."""
    log = log or (lambda message: print(message))
    path = os.path.abspath(path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if os.path.isdir(os.path.join(root, "state")):  # a step directory itself
        if integrity.has_checksums(root):
            problem = integrity.verify_checksums(root)
            if problem:
                raise CheckpointError(f"{root}: {problem}")
        return root
    if not os.path.isdir(root):
        raise InputFileNotFoundError(f"{path}: no checkpoint directory (expected a training workdir, its "
                                     f"checkpoints/ or a params directory)")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)
    for step in steps:
        step_dir = os.path.join(root, str(step))
        if not os.path.isdir(os.path.join(step_dir, "state")):
            problem = "it has no state item (emptied or partial)"
        elif integrity.has_checksums(step_dir):
            problem = integrity.verify_checksums(step_dir)
        else:
            problem = None
        if problem is None:
            return step_dir
        log(f"checkpoint: passing over step {step} of {root}: {problem}")
    raise FileNotFoundError(f"{root} holds no checkpoint" + (" that verifies" if steps else ""))


def restore_params(path: str) -> Any:
    """Params (host numpy arrays) from a training workdir's newest checkpoint that verifies, or from a
    checkpoint step / params directory (`params_dir`); used for `init=` (pretrained weights) and evaluation.
    Works whatever devices or processes wrote it: every array is restored onto this process's first device."""
    item = os.path.join(params_dir(path), "state")
    with _without_step_metadata_warning():
        checkpointer = ocp.StandardCheckpointer()
        metadata = checkpointer.metadata(item)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = checkpointer.restore(item, abstract)
        checkpointer.close()
    return jax.device_get(restored["params"])


class _StepMetadataFilter(logging.Filter):
    """Drops Orbax's "Metadata file does not exist: .../state/_CHECKPOINT_METADATA": reading one item of a
    step (`restore_params`) looks for the step's metadata inside the item, where it never is (issue #23)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()


@contextlib.contextmanager
def _without_step_metadata_warning():
    absl_logger, noise = logging.getLogger("absl"), _StepMetadataFilter()
    absl_logger.addFilter(noise)
    try:
        yield
    finally:
        absl_logger.removeFilter(noise)
