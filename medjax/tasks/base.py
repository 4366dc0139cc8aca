"""The task contract (DESIGN.md): the only thing the trainer, `evaluate`, `predict` and `bench` know about a
model family. Every registered task subclasses `TaskBase`; the optional hooks are methods with defaults
here, so callers call methods and never probe a task with hasattr/getattr."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import grain
import jax

from medjax import optim as optim_lib
from medjax.config import ConfigError
from medjax.data.pipelines.bad_examples import POLICIES
from medjax.data.verify import MODES as VERIFY_MODES
from medjax.data.verify import FileCheck, verify_files
from medjax.params import merge_params

Batch = Mapping[str, Any]


def model_config(config):
    """The experiment's `model` block plus the run-wide compute dtype and kernel implementation (what the
    model builders of several families take)."""
    cfg = config.model.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.dtype = config.dtype
        cfg.kernel_impl = config.kernels.impl
    return cfg


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a task needs from the run (the `train` block, `init` and the workdir), passed in so that tasks
    read only their own config blocks. `workdir`: where the start-up data check caches its results
    (`medjax.data.verify`); None (evaluate, bench, tests) = no cache. `results_dir`: where an evaluation writes
    files beside its table (e.g. generated answers for judging): evaluate's --out or checkpoint; None = workdir."""

    global_batch: int
    eval_batch_size: int
    total_steps: int
    init: str = ""
    workdir: str | None = None
    results_dir: str | None = None

    @classmethod
    def from_config(cls, config, workdir: str | None = None, results_dir: str | None = None) -> "RunSettings":
        train = config.train
        return cls(global_batch=int(train.batch_size), eval_batch_size=int(train.eval_batch_size),
                   total_steps=int(train.steps), init=str(config.get("init", "") or ""), workdir=workdir,
                   results_dir=results_dir)


def markdown_table(exp: str, columns: list[tuple[str, dict[str, float]]], percent: tuple[str, ...] = ()) -> str:
    """One row, one column group per evaluated checkpoint: every metric evaluate returned (those named in
    `percent`, fractions, shown in percent), each with its chance level beside it where evaluate gave one
    (`<metric>_chance`, medjax.metrics.chance)."""
    from medjax.metrics.chance import CHANCE_SUFFIX

    metrics = [k for k in columns[0][1] if k != "examples" and not k.endswith(CHANCE_SUFFIX)]
    header = "| Method | " + " | ".join(f"{label} {m}" for label, _ in columns for m in metrics) + " |"
    rule = "|---|" + "---|" * (len(columns) * len(metrics))

    def cell(r, m):
        show = (lambda v: f"{100 * v:.2f}") if m in percent else (lambda v: f"{v:.4f}")
        chance = r.get(m + CHANCE_SUFFIX)
        return show(r[m]) + (f" (chance {show(chance)})" if chance is not None else "")

    row = f"| medjax {exp} | " + " | ".join(cell(r, m) for _, r in columns for m in metrics) + " |"
    return "\n".join([header, rule, row])


class TaskBase:
    """A model family. Subclasses set `self.model` and implement the five required methods; the rest
    are optional hooks with the defaults below."""

    demo_variant: ClassVar[str | None] = "demo"  # what `python -m medjax.train --exp NAME` runs without --data
    model: nn.Module

    def __init__(self, config, log=print, run: RunSettings | None = None):
        self.config, self.log = config, log
        self.run = run if run is not None else RunSettings.from_config(config)
        self.global_batch = self.run.global_batch

    # ---- required ------------------------------------------------------------------------------------
    def init_batch(self) -> Batch:
        """A global batch of the right shapes/dtypes (numpy), for init and tracing."""
        raise NotImplementedError(f"{type(self).__name__}.init_batch")

    def init_params(self, rng: jax.Array) -> Any:
        """Params as boxed `nn.Partitioned` leaves (logical axis names), from `init_batch()`."""
        raise NotImplementedError(f"{type(self).__name__}.init_params")

    def loss_fn(self, params: Any, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """(scalar loss, dict of scalar metrics) on a global batch."""
        raise NotImplementedError(f"{type(self).__name__}.loss_fn")

    def train_data(self) -> grain.IterDataset:
        """This process's share of each global batch, checkpointable."""
        raise NotImplementedError(f"{type(self).__name__}.train_data")

    def evaluate(self, params: Any) -> dict[str, float]:
        """The paper's metrics on the evaluation split."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    # ---- validation and the best-validation checkpoint (medjax.best_checkpoint) -------------------------
    def validate(self, params: Any) -> dict[str, float]:
        """Metrics on the validation split: what `train.eval_every` logs (as val/<name>) and the best-validation
        checkpoint selects by (`train.select_metric`). Default: `evaluate(params)`; a task whose `evaluate` reads
        a test split overrides this, so that the selection never sees test data."""
        return self.evaluate(params)

    def selection_metric(self) -> tuple[str, str] | None:
        """(a `validate` metric, "max" | "min"): what the best-validation checkpoint follows when
        `train.select_metric` is "" (e.g. the original's `ModelCheckpoint(monitor=...)`); None: none is kept
        unless the config names one."""
        return None

    # ---- data checks (issue #15), for the tasks' dataset builders -------------------------------------
    @property
    def on_bad_example(self) -> str:
        """`data.on_bad_example` ("error" | "skip", medjax.data.pipelines.bad_examples), checked; pass it to the
        pipeline (`global_batch_dataset(..., on_bad_example=)`)."""
        value = str(self.config.get("data", {}).get("on_bad_example", "error"))
        if value not in POLICIES:
            raise ConfigError(f"config data.on_bad_example={value!r}: expected one of {', '.join(POLICIES)}")
        return value

    def verify_data(self, checks: Sequence[FileCheck]) -> None:
        """The start-up check of these data files (medjax.data.verify) by `data.verify` (full | headers |
        none), cached in the run's workdir; with data.on_bad_example=skip failures are a warning."""
        mode = str(self.config.get("data", {}).get("verify", "full"))
        if mode not in VERIFY_MODES:
            raise ConfigError(f"config data.verify={mode!r}: expected one of {', '.join(VERIFY_MODES)}")
        verify_files(checks, mode=mode, cache_dir=self.run.workdir, log=self.log,
                     skip_bad=self.on_bad_example == "skip")

    # ---- optional hooks ------------------------------------------------------------------------------
    def load_pretrained(self, params: Any, pretrained: Any) -> Any:
        """Params with the leaves of `pretrained` (e.g. a pretraining run's params) of the same path and
        shape put in. The leaves not taken (a new head, another layout) are logged; a source of which no
        leaf fits (another model's run) is an error, never a silent start from scratch."""
        merged, skipped = merge_params(params, pretrained)
        total = len(jax.tree_util.tree_leaves(params))
        if skipped and len(skipped) == total:
            raise ValueError(f"init: none of the {total} params fit the pretrained tree (path or shape differs), "
                             f"e.g. {', '.join(skipped[:4])}: is `init` a run of this model?")
        if skipped:
            self.log(f"init: {len(skipped)} of {total} params keep their initialisation: {', '.join(skipped[:8])}"
                     + (" ..." if len(skipped) > 8 else ""))
        return merged

    def initial_params(self, params: Any) -> Any:
        """Params for a run starting from scratch (no checkpoint, no `init=`), e.g. with towers loaded from
        converted Hugging Face weights the config names. Gets the freshly created (sharded) params; returns
        them unchanged (the same object: nothing to load, nothing copied to the host) or a new tree whose
        replaced parts may be host arrays (the trainer places them with the params' shardings)."""
        return params

    def optim_config(self):
        """The `optim` block medjax.optim builds the optimizer from; a task overrides this only where one
        of its own switches must also change the optimizer (PTUnifier's reproduce_released_code)."""
        return self.config.optim

    def make_optimizer(self, total_steps: int):
        """(optax transformation, lr schedule) from `optim_config()` (medjax.optim)."""
        return optim_lib.make_optimizer(self.optim_config(), total_steps, self.global_batch)

    def post_update(self, params: Any, metrics: dict, step: jax.Array) -> tuple[Any, dict]:
        """Inside the jitted step, after the optimizer update: e.g. an EMA teacher or running centers.
        `metrics` is what loss_fn returned (averaged over microbatches); non-scalar entries it consumes
        must be removed, so the returned metrics are scalars."""
        return params, metrics

    def work_per_example(self) -> tuple[int, str] | None:
        """(count, unit) one example is worth for throughput, e.g. (197, "tokens") or (884736, "voxels");
        None when the family declares none."""
        return None

    def work_in_batch(self, batch: dict) -> int:
        """The work this process's `batch` (as `train_data` yields it) holds, in `work_per_example`'s unit: by
        default the count per example times the process's rows; a task whose rows carry padding overrides it
        (PathChat with length buckets: the real tokens, not max_length's)."""
        work = self.work_per_example()
        return 0 if work is None else int(work[0]) * (self.global_batch // jax.process_count())

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """A markdown table in the paper's layout, one column group per evaluated checkpoint."""
        return markdown_table(exp, columns)

    def column_label(self, saved_config: dict, path: str) -> str:
        """The results-table label of the checkpoint at `path`, whose run saved `saved_config` (its
        config.json, {} if none): the checkpoint folder's name; a task whose paper labels columns by a
        run setting (e.g. the label fraction) overrides this."""
        return os.path.basename(os.path.normpath(path))
