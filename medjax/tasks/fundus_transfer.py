"""What MRM's transfer tasks share (Yang et al., ICCV 2023, Tab. 1: APTOS, RFMiD, PALM fine-tuned with 1% / 10% /
100% of the labels, rows MRM, MAE and the other pretrainings): the label-fraction subset of a training split, the
pretraining a fine-tuning run started from, and the transfer table (one row per label fraction, a column per
pretraining and metric)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.errors import MedjaxInputError
from medjax.metrics.chance import CHANCE_SUFFIX
from medjax.tasks.base import TaskBase
from medjax.tasks.common import label_fraction_label

# a pretraining run's task -> its name in the transfer table
PRETRAINING_NAMES = {"mrm": "MRM", "mrm_mae": "MAE"}


def fraction_subset(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * count) rows (at least 1), drawn without replacement with `seed` (a
    multi-label or segmentation set has no class to stratify by)."""
    if not 0.0 < fraction <= 1.0:
        raise MedjaxInputError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(count)
    size = max(1, int(round(fraction * count)))
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def pretraining_label(saved_config: dict) -> str:
    """"MRM" / "MAE" for a fine-tuning run whose `init` is an mrm / mrm_mae pretraining workdir (read from that
    workdir's config.json), "scratch" without `init`, else the init directory's name."""
    init = str(saved_config.get("init", "") or "")
    if not init:
        return "scratch"
    path = os.path.join(init, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                task = json.load(f).get("task")
        except (OSError, ValueError):
            task = None
        if task in PRETRAINING_NAMES:
            return PRETRAINING_NAMES[task]
    return os.path.basename(os.path.normpath(init))


def transfer_column_label(saved_config: dict, path: str) -> str:
    """"<pretraining> <fraction>" (e.g. "MRM 10%"); the checkpoint folder's name stands in for a missing part."""
    fraction = label_fraction_label(saved_config) or os.path.basename(os.path.normpath(path))
    return f"{pretraining_label(saved_config)} {fraction}"


def transfer_table(dataset: str, columns: list[tuple[str, dict[str, float]]], metrics: tuple[str, ...],
                   percent: bool = True) -> str:
    """MRM Tab. 1's layout for one dataset: a row per label fraction, a column per (pretraining, metric), from
    columns labelled "<pretraining> <fraction>" (`transfer_column_label`). Each cell shows its chance level beside
    it where the results hold one (`<metric>_chance`: "81.00 (chance 50.00)"); cells of runs not given are "-"."""
    methods, fractions, cells = [], [], {}
    for label, results in columns:
        method, _, fraction = label.rpartition(" ")
        method = method or label
        methods += [method] if method not in methods else []
        fractions += [fraction] if fraction not in fractions else []
        cells[method, fraction] = results
    number = (lambda v: f"{100 * v:.2f}") if percent else (lambda v: f"{v:.4f}")

    def show(r, k):  # with its chance level beside it where evaluate gave one (medjax.metrics.chance)
        chance = r.get(k + CHANCE_SUFFIX)
        return number(r[k]) + (f" (chance {number(chance)})" if chance is not None and np.isfinite(chance) else "")

    header = f"| {dataset} labels | " + " | ".join(f"{m} {k}" for k in metrics for m in methods) + " |"
    rule = "|---|" + "---|" * (len(metrics) * len(methods))
    rows = []
    for fraction in sorted(fractions, key=_fraction_key):
        values = []
        for k in metrics:
            for m in methods:
                r = cells.get((m, fraction))
                values.append(show(r, k) if r is not None and k in r and np.isfinite(r[k]) else "-")
        rows.append(f"| {fraction} | " + " | ".join(values) + " |")
    return "\n".join([header, rule, *rows])


def _fraction_key(fraction: str):
    try:
        return (0, float(fraction.rstrip("%")))
    except ValueError:
        return (1, fraction)


class FundusTransferTask(TaskBase):
    """The family of MRM's transfer tasks (APTOS grading, RFMiD multi-label, PALM segmentation): a pretrained
    fundus image encoder fine-tuned on `self.train_set` (a label-fraction subset) with `self._train_transform`."""

    train_set: object
    _train_size: int

    def _train_transform(self, example, rng):
        raise NotImplementedError(f"{type(self).__name__}._train_transform")

    def train_data(self):
        # said here, not at construction: `evaluate` builds the task too, and its checkpoint's fraction is its own
        self.log(f"fine-tuning on {len(self.train_set)} of {self._train_size} labelled training images "
                 f"(data.label_fraction={self.config.data.label_fraction})")
        return global_batch_dataset(
            self.train_set, global_batch=self.global_batch, seed=int(self.config.seed),
            transform=self._train_transform, process_index=jax.process_index(), process_count=jax.process_count(),
            on_bad_example=self.on_bad_example)

    @staticmethod
    def pretrained_encoder(pretrained) -> dict:
        """The ViT encoder params of an MRM / MAE pretraining run (`image_encoder`) or of a fine-tuned model
        (`encoder`, or `model/encoder`)."""
        source = pretrained.get("image_encoder", pretrained.get("encoder"))
        if source is None and isinstance(pretrained.get("model"), dict):
            source = pretrained["model"].get("encoder")
        if source is None:
            raise MedjaxInputError(f"init: the checkpoint has no `image_encoder` or `encoder` params (top-level "
                                   f"keys: {sorted(pretrained)})")
        return source

    @staticmethod
    def merge_encoder(encoder, source):
        from medjax.params import merge_params

        merged, mismatched = merge_params(encoder, source)
        if mismatched:
            raise MedjaxInputError("init: the pretrained encoder does not match the model config: "
                                   + ", ".join(mismatched[:8]))
        return merged
