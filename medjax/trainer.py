"""The one generic training loop: sharded jit step, optax, metrics, Orbax checkpoints, exact resume.

A model family plugs in as a `Task` (medjax/tasks/base.py); nothing here knows about papers.
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import best_checkpoint as best_lib
from medjax import checkpoint as checkpoint_lib
from medjax.config import ConfigError
from medjax.data.pipelines.bad_examples import SKIPPED_KEY
from medjax import provenance as provenance_lib
from medjax import train_state as state_lib
from medjax.disk_full import DiskFullError, disk_full_cause, disk_full_message
from medjax.global_norm import global_norm
from medjax.metric_writer import MetricWriter
from medjax.parallel import mesh as mesh_lib
from medjax.parallel import rules as rules_lib
from medjax.workdir_lock import WorkdirLock, WorkdirLockedError


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient, update or param norm) became NaN/inf; the run stops and the last good
    checkpoint is kept."""


FINITE_CHECKED = ("loss", "grad_norm", "update_norm", "param_norm")
SKIPPED_METRIC = "data/skipped"  # examples replaced (data.on_bad_example=skip), summed over the logged interval


def global_batch(local_batch: dict, sharding, process_count: int) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded along the batch dimension."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (v.shape[0] * process_count,) + v.shape[1:])
        for k, v in local_batch.items()
    }


def make_train_step(task, tx: optax.GradientTransformation, schedule, grad_accum: int):
    """train_step(state, batch) -> (state, metrics); the step is folded into the RNG."""

    def loss_and_grad(params, batch, rng):
        return jax.value_and_grad(lambda p: task.loss_fn(p, batch, rng, True), has_aux=True)(params)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]
        batch = dict(batch)
        skipped = batch.pop(SKIPPED_KEY, None)  # data.on_bad_example=skip: replaced examples per element
        if grad_accum == 1:
            (loss, metrics), grads = loss_and_grad(params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def accumulate(carry, inputs):
                index, microbatch = inputs
                (loss_i, metrics_i), grads_i = loss_and_grad(params, microbatch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (loss_i, metrics_i, grads_i)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng))
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, (loss, metrics, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params, metrics = task.post_update(new_params, metrics, state["step"])  # e.g. an EMA teacher
        metrics = dict(metrics, loss=loss, grad_norm=global_norm(grads),  # few ops (medjax.global_norm)
                       param_norm=global_norm(new_params), update_norm=global_norm(updates),
                       lr=schedule(state["step"]))
        if skipped is not None:
            metrics[SKIPPED_METRIC] = jnp.sum(skipped).astype(jnp.float32)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def validate_run_config(config) -> None:
    """Refuse run settings that would crash later or lose work, naming the key (ConfigError; issue: keep_checkpoints=0
    deleted every checkpoint; log_every=0 divided by zero; a NaN or non-positive lr trained garbage)."""
    train = config.train
    positive = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                "eval_batch_size")
    for key in positive:
        if int(train[key]) < 1:
            raise ConfigError(f"config train.{key}={train[key]}: expected an integer >= 1")
    for key in ("stop_at", "eval_every"):
        if int(train.get(key, 0)) < 0:
            raise ConfigError(f"config train.{key}={train[key]}: expected an integer >= 0 (0 = off)")
    if str(train.get("select_mode", "") or "") not in ("",) + best_lib.MODES:
        raise ConfigError(f"config train.select_mode={train.select_mode!r}: expected one of {', '.join(best_lib.MODES)} "
                          "(or '' for the task's)")
    lr = float(config.optim.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"config optim.lr={config.optim.lr}: expected a finite learning rate > 0")


class Trainer:
    """Builds the mesh, the sharded state, the jitted step and the checkpointer for one task."""

    def __init__(self, config, task, workdir: str):
        self.config, self.task, self.workdir = config, task, os.path.abspath(workdir)
        train = config.train
        validate_run_config(config)
        self.mesh = mesh_lib.make_mesh(config.mesh)
        self.rules = rules_lib.logical_rules(config.mesh.rules)
        self.process_count = jax.process_count()
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        dp = mesh_lib.data_parallel_size(self.mesh)
        if train.batch_size % dp:
            raise ConfigError(f"train.batch_size={train.batch_size} does not divide over {dp} data-parallel devices")
        if train.batch_size % int(train.grad_accum):
            raise ConfigError(f"train.batch_size={train.batch_size} does not divide into train.grad_accum={train.grad_accum} microbatches")
        self.tx, self.schedule = task.make_optimizer(int(train.steps))
        rng = jax.random.PRNGKey(int(config.seed))
        self.state, self.state_shardings = state_lib.create_sharded_state(
            task.init_params, self.tx, rng, self.mesh, self.rules)
        self.checkpointer = checkpoint_lib.Checkpointer(
            self.workdir, interval=int(train.checkpoint_every), keep=int(train.keep_checkpoints),
            provenance=provenance_lib.run_record(config))
        self.selection = best_lib.selection(config, task)  # (metric, mode) of the best-validation checkpoint, or None
        step_fn = make_train_step(task, self.tx, self.schedule, int(train.grad_accum))
        replicated = mesh_lib.replicated(self.mesh)
        self.train_step = jax.jit(
            step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated), donate_argnums=0,
        )
        self._stop_signal = False

    # ----- state sources: workdir checkpoint > config.init > scratch -----
    def restore_or_init(self, data_iterator) -> str:
        if self.checkpointer.latest_step() is not None:
            target = state_lib.abstract_state(self.state_shardings, self.state)
            self.state = self.checkpointer.restore(target, data_iterator)  # the newest step that verifies
            return f"resumed from {self.checkpointer.directory} at step {self.checkpointer.restored_step}"
        init = self.config.get("init", "")
        if init:
            pretrained = checkpoint_lib.restore_params(init)
            params = self.task.load_pretrained(jax.device_get(self.state["params"]), pretrained)
            self.state["params"] = state_lib.place_params(params, self.state_shardings["params"])
            self.state["opt_state"] = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(self.state["params"])
            return f"initialised from {init}"
        params = self.task.initial_params(self.state["params"])
        if params is not self.state["params"]:  # e.g. towers from converted HF weights
            self.state["params"] = state_lib.place_params(params, self.state_shardings["params"])
            self.state["opt_state"] = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(self.state["params"])
            return "initialised from scratch and the task's pretrained parts (initial_params)"
        return "initialised from scratch"

    def compile(self, example_batch):
        """Ahead-of-time compile; returns (compiled step, seconds, memory analysis or None)."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            compiled = self.train_step.lower(self.state, example_batch).compile()
        seconds = time.perf_counter() - start
        try:
            memory = compiled.memory_analysis()
        except Exception:  # some backends do not report it
            memory = None
        return compiled, seconds, memory

    def _on_sigterm(self, signum, frame):
        self._stop_signal = True

    def _stop_requested(self, agree: bool) -> bool:
        """SIGTERM seen here or, in a multi-process run, by any process: all stop at the same step (a
        process stopping alone would leave the others waiting in the next step's collectives). Processes
        agree only at `agree` steps (log and checkpoint steps), not with a collective every step."""
        if self.process_count == 1:
            return self._stop_signal
        if not agree:
            return False
        from jax.experimental import multihost_utils

        agreed = bool(np.any(multihost_utils.process_allgather(np.asarray(self._stop_signal))))
        self._stop_signal = self._stop_signal or agreed  # a signal arriving meanwhile counts next time
        return agreed

    def _lock_workdir(self) -> WorkdirLock:
        """Process 0 takes the workdir lock; every process learns whether it did and refuses alike."""
        lock, error = WorkdirLock(self.workdir), ""
        if jax.process_index() == 0:
            try:
                lock.acquire()
            except WorkdirLockedError as err:
                error = str(err)
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            if not bool(multihost_utils.broadcast_one_to_all(np.asarray(not error))):
                error = error or f"{self.workdir}: process 0 could not lock the workdir (see its output)"
        if error:
            self.checkpointer.close()
            raise WorkdirLockedError(error)
        return lock

    def run(self) -> dict[str, Any]:
        lock = self._lock_workdir()
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> dict[str, Any]:
        config, train = self.config, self.config.train
        total_steps = int(train.steps)
        stop_at = int(train.stop_at) or total_steps
        writer = MetricWriter(self.workdir, total_steps)
        self.checkpointer.log = writer.log
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        data_iterator = iter(self.task.train_data())
        writer.log(self.restore_or_init(data_iterator))
        best = None
        if self.selection is not None:  # after the restore: its value survives a restart (medjax.best_checkpoint)
            best = best_lib.BestCheckpoint(self.workdir, *self.selection, provenance=self.checkpointer.provenance,
                                           log=writer.log)
        step = int(jax.device_get(self.state["step"]))
        writer.resume_from(step)  # drop metrics rows a previous run logged past the restored step
        if step >= min(stop_at, total_steps):
            writer.log(f"nothing to do: checkpoint at step {step}, train.steps={total_steps}")
            writer.close()
            self.checkpointer.close()
            return {"step": step, "losses": []}
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _in_main_thread() else None
        losses, last_good_step, programs = [], step, {}  # one compiled step per batch shape (length buckets)
        pending: list[tuple[int, Any]] = []  # (step, metrics on device) since the last host sync
        interval_start, interval_examples, interval_skipped = time.perf_counter(), 0, 0.0
        log_every, eval_every = int(train.log_every), int(train.get("eval_every", 0))
        end = min(stop_at, total_steps)
        try:
            while step < end:
                batch = global_batch(next(data_iterator), self.batch_sharding, self.process_count)
                shapes = batch_shapes(batch)
                if shapes not in programs:
                    programs[shapes], seconds, memory = self.compile(batch)
                    extra = f" (batch shape {len(programs)}: {dict(shapes)})" if len(programs) > 1 else ""
                    writer.log(f"compiled train step in {seconds:.1f}s{extra}; {describe_memory(memory)}")
                    interval_start = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    self.state, metrics = programs[shapes](self.state, batch)
                step += 1
                self.checkpointer.seal_finished()  # checksums of a background save that has finished
                interval_examples += int(train.batch_size)
                pending.append((step, metrics))
                final = step == end
                saving = self.checkpointer.will_save(step, force=final)
                sync = saving or final or step % log_every == 0
                if sync:  # one host sync per log / checkpoint step (big_vision): check, then log
                    values = self._check_finite(pending)
                    losses.extend(v["loss"] for v in values)
                    interval_skipped += sum(v.get(SKIPPED_METRIC, 0.0) for v in values)
                    pending, last_good_step = [], step
                    if step % log_every == 0 or final:
                        elapsed = time.perf_counter() - interval_start
                        row = dict(values[-1], examples_per_sec=interval_examples / max(elapsed, 1e-9))
                        if SKIPPED_METRIC in row:
                            row[SKIPPED_METRIC] = interval_skipped
                        writer.write(step, row)
                        interval_start, interval_examples, interval_skipped = time.perf_counter(), 0, 0.0
                if saving:
                    self.checkpointer.save(step, self.state, data_iterator, force=final)
                if eval_every and (step % eval_every == 0 or (final and best is not None)):
                    results = self.task.validate(self.state["params"])
                    writer.write(step, {f"{best_lib.VALIDATION_PREFIX}{k}": v for k, v in results.items()})
                    if best is not None:
                        best.update(step, results, self.state["params"])
                if self._stop_requested(agree=sync):
                    if pending:
                        losses.extend(v["loss"] for v in self._check_finite(pending))
                        pending, last_good_step = [], step
                    writer.log(f"SIGTERM: saving a checkpoint at step {step} and exiting")
                    if self.checkpointer.latest_step() != step:
                        self.checkpointer.save(step, self.state, data_iterator, force=True)
                    break
            self.checkpointer.wait()  # a full disk surfaces here at the latest, still inside the try
        except Exception as err:
            cause = disk_full_cause(err)
            if cause is None:
                raise
            raise DiskFullError(disk_full_message(
                cause, step=step, last_checkpoint=self._last_complete_step(), directory=self.checkpointer.directory)) from None
        finally:
            try:
                self.checkpointer.close()
            except Exception as err:  # the failed save surfaces again; already reported above
                if disk_full_cause(err) is None:
                    raise
            writer.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return {"step": last_good_step, "losses": losses, "preempted": self._stop_signal}

    def _last_complete_step(self) -> int | None:
        """The newest checkpoint step on disk that is complete (its checksums recorded after its save)."""
        from medjax import checkpoint_integrity as integrity

        try:
            self.checkpointer.wait()  # steps saved before the failure are complete: record them
        except Exception:  # the failure itself, already being reported
            pass
        complete = [s for s in self.checkpointer.manager.all_steps() if integrity.has_checksums(self.checkpointer.step_dir(s))]
        return max(complete, default=None)

    def _check_finite(self, pending: list[tuple[int, Any]]) -> list[dict[str, float]]:
        """The metrics of `pending` steps as floats, after one device_get; raises NonFiniteLossError naming
        the first step whose loss, gradient, update or param norm is not finite (nothing of it is saved)."""
        fetched = jax.device_get([m for _, m in pending])
        values = [{k: float(v) for k, v in m.items()} for m in fetched]
        for (step, _), v in zip(pending, values):
            bad = [k for k in FINITE_CHECKED if k in v and not math.isfinite(v[k])]
            if bad:
                raise NonFiniteLossError(
                    f"{', '.join(f'{k}={v[k]}' for k in bad)} at step {step} (steps {pending[0][0]}-"
                    f"{pending[-1][0]} checked together); stopping. The last good checkpoint (step "
                    f"{self.checkpointer.latest_step()}) is kept in {self.checkpointer.directory}")
        return values


def batch_shapes(batch: dict) -> tuple:
    """A hashable key of a batch's array shapes: a task whose batches come in a few static shapes (length
    buckets, e.g. PathChat's data.length_buckets) gets one compiled step per shape, compiled on first use."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return tuple((jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in leaves)


def describe_memory(memory) -> str:
    if memory is None:
        return "compiled memory: not reported by this backend"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    parts = [f"{f.replace('_size_in_bytes', '')}={getattr(memory, f, 0) / 2**20:.1f}MiB" for f in fields]
    return "compiled memory: " + " ".join(parts)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
