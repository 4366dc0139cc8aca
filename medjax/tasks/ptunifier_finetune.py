"""What the PTUnifier fine-tuning tasks share (Chen et al., ICCV 2023, Sec. 4, Tables 1-4): the tokenizer,
the `model` block checked against it, the backbone + task head model, pretrained loading, the training
pipeline and the eval-batch loop. One task per downstream kind, each registered in `medjax.tasks.TASKS`:

* `ptunifier_vqa`            medjax/tasks/ptunifier_vqa.py             (VQA-RAD, SLAKE, MedVQA-2019)
* `ptunifier_classification` medjax/tasks/ptunifier_classification.py  (CheXpert, RSNA pneumonia)
* `ptunifier_retrieval`      medjax/tasks/ptunifier_retrieval.py       (ROCO)
* `ptunifier_nli`            medjax/tasks/ptunifier_nli.py             (RadNLI)
* `ptunifier_melinda`        medjax/tasks/ptunifier_melinda.py         (MELINDA)
* `ptunifier_reportgen`      medjax/tasks/ptunifier_reportgen.py       (MIMIC-CXR report generation / summarisation)

Optimisation as the original (configuration, experiments/_ptunifier_finetune.py): AdamW (0.9, 0.98), wd
0.01 except biases/norms, lr 5e-6 with x`head` for the heads and x`multi_modal` for the fusion,
projections, poolers and prompt pools, linear warmup over 10% of the steps then linear decay to 0.

The released fine-tuning protocol (`main.py`, `ptunifier_module.py`, `run_scripts/finetune.sh`), each a
config switch whose other value keeps the alternative:
* `freeze_prompt_pools` (True): the pools get no gradient, no update and no weight decay (the original's
  `requires_grad=False` outside pretraining); False trains them at the multi-modal lr.
* `resize_position_table_at_load` (True): the model's position table is built at `data.image_size`
  (384 -> 24x24 + CLS) and a checkpoint's table of another grid is resized bicubically ONCE when loaded
  (the original's `adapt_position_encoding`), then trained; fine-tuned checkpoints carry the new table.
  False keeps `model.image_size` (the pretraining grid) and resizes the table at every forward pass.
* `data.resized_crop`: `clip_resizedcrop` (RandomResizedCrop scale 0.9-1) for training images, set per
  dataset by the experiments (VQA-RAD plain `clip`).
* Model selection: each kind declares the original's `val/the_metric` (`SELECTION`: VQA overall score, mlc
  AUROC, cls accuracy, irtr ir_r1 + tr_r1 - loss, clm BLEU sum / ROUGE-L); `validate` scores `data.val_split`
  and with `train.eval_every` the trainer keeps `best/` by it, which `medjax.evaluate --checkpoint` reads.
"""
from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.data.readers.image_report import ImageReportDataset, clip_transform, load_tokenizer, tokenize
from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.models.ptunifier_finetune import finetune_model_from_config
from medjax.data.verify import image_report_checks
from medjax.nn.clip_vit import resize_position_embedding
from medjax.params import merge_params
from medjax.tasks.base import TaskBase
from medjax.tasks.common import data_root
from medjax.errors import MedjaxInputError

PROMPT_POOL_PARAMS = r"^(visual_prompts|textual_prompts)(/|$)"  # frozen with freeze_prompt_pools


class PTUnifierFinetuneTask(TaskBase):
    """The shared base of the fine-tuning tasks. A subclass implements `dataset(split)`, `num_outputs()`
    (task-head classes, 0 for none), `example`, `init_batch`, `loss_fn` and `scores(params, dataset)` (its
    metrics on a split: `evaluate` on data.eval_split, `validate` on data.val_split), names its paper-table
    columns in `TABLE` (label, metric key) with the factor `TABLE_SCALE` that turns them into percent, and
    declares the original's selection metric in `SELECTION`."""

    TABLE: ClassVar[tuple[tuple[str, str], ...]] = ()
    TABLE_SCALE: ClassVar[float] = 1.0
    # the original's `val/the_metric` as (a `validate` key, "max" | "min"): what the best-validation checkpoint
    # follows with train.eval_every (medjax.best_checkpoint; the original's ModelCheckpoint(monitor=...))
    SELECTION: ClassVar[tuple[str, str] | None] = None
    NEW_PARAMS: ClassVar[tuple[str, ...]] = ("task_head",)  # top-level params a pretraining run lacks

    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        self.tokenizer = load_tokenizer(config.data.tokenizer or os.path.join(self.root, "tokenizer"))
        self.image_size, self.max_length = int(config.data.image_size), int(config.data.max_text_len)
        self.train_set = self.training_set()
        log(f"ptunifier fine-tuning ({config.task}): {len(self.train_set)} training examples")
        self.model_cfg = self._model_config()
        self.model = self.build_model(jnp.dtype(config.dtype))

    # ---- what a kind defines -------------------------------------------------------------------
    def dataset(self, split: str):
        """The random-access dataset of `split` (examples as dicts)."""
        raise NotImplementedError(f"{type(self).__name__}.dataset")

    def num_outputs(self) -> int:
        """Classes of the task head (from `self.train_set`); 0 = no task head."""
        raise NotImplementedError(f"{type(self).__name__}.num_outputs")

    def example(self, ex: dict, rng=None) -> dict:
        """Arrays of one example; `rng` is given for training examples only (augmentation: `self.image`)."""
        raise NotImplementedError(f"{type(self).__name__}.example")

    def scores(self, params, dataset) -> dict[str, float]:
        """The kind's metrics over every example of `dataset`."""
        raise NotImplementedError(f"{type(self).__name__}.scores")

    def build_model(self, dtype):
        """The backbone + task head of `num_outputs()` classes (a kind with another model overrides this)."""
        return finetune_model_from_config(self.model_cfg, self.num_outputs(), dtype)

    def training_set(self):
        """The training rows: the whole `data.train_split` unless a kind subsamples it."""
        return self.checked_dataset(self.config.data.train_split)

    # ---- shared --------------------------------------------------------------------------------
    def _model_config(self):
        """The `model` block with vocab_size (0 = the tokenizer's size) and the special token ids checked
        against / taken from the tokenizer, as the pretraining task does."""
        cfg, tok = self.config.model.copy_and_resolve_references(), self.tokenizer
        with cfg.unlocked():
            cfg.vocab_size = int(cfg.vocab_size) or len(tok)
            if self.freeze_prompt_pools:
                cfg.prompts_trainable = False  # selection without gradient to the pools, as the original
            if self.config.get("resize_position_table_at_load", True):
                cfg.image_size = self.image_size  # the table lives at the fine-tuning grid (load_pretrained)
            for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
                if getattr(tok, name) is None:
                    raise MedjaxInputError(f"the tokenizer has no {name}")
                cfg[name] = int(getattr(tok, name))
        if len(tok) > cfg.vocab_size:
            raise MedjaxInputError(f"the tokenizer has {len(tok)} tokens, more than model.vocab_size={cfg.vocab_size}")
        longest = int(self.config.data.max_text_len) + (cfg.pad_token_id + 1 if cfg.roberta_positions else 0)
        if cfg.max_positions < longest:
            raise MedjaxInputError(f"model.max_positions={cfg.max_positions} is too small for data.max_text_len="
                             f"{self.config.data.max_text_len} (needs >= {longest})")
        return cfg

    @property
    def freeze_prompt_pools(self) -> bool:
        return bool(self.config.get("freeze_prompt_pools", True))

    def optim_config(self):
        """`optim` plus, with `freeze_prompt_pools`, the pools frozen (no update, no weight decay)."""
        optim = self.config.optim
        if not self.freeze_prompt_pools:
            return optim
        optim = optim.copy_and_resolve_references()
        with optim.unlocked():
            optim.frozen = list(optim.get("frozen", ()) or ()) + [PROMPT_POOL_PARAMS]
        return optim

    def image(self, image, rng=None) -> np.ndarray:
        """A training (`rng` given) or evaluation image as float32 (size, size, 3): `clip_resizedcrop`
        for training when `data.resized_crop`, else the plain `clip` transform."""
        return clip_transform(image, self.image_size, rng, resized_crop=bool(self.config.data.get("resized_crop", False)))

    def path(self, split: str) -> str:
        """The manifest / Arrow file of `split` (`data.file` with `{split}` filled in)."""
        return finetune_data.resolve(self.root, self.config.data.file, split)

    def checked_dataset(self, split: str):
        """`dataset(split)` with its images checked at build (data.verify, medjax.data.verify)."""
        dataset = self.dataset(split)
        if isinstance(dataset, (finetune_data.VQADataset, finetune_data.MultiLabelDataset,
                                finetune_data.ImageTextLabelDataset, finetune_data.ReportDataset)):
            self.verify_data(image_report_checks(dataset.images))  # their images: an ImageReportDataset
        elif isinstance(dataset, ImageReportDataset):
            self.verify_data(image_report_checks(dataset))
        return dataset

    @functools.cached_property
    def eval_set(self):
        return self.checked_dataset(self.config.data.eval_split)

    @functools.cached_property
    def val_set(self):
        split = str(self.config.data.get("val_split", "val"))
        return self.eval_set if split == str(self.config.data.eval_split) else self.checked_dataset(split)

    def evaluate(self, params) -> dict[str, float]:
        """The paper's metrics on `data.eval_split`."""
        return self.scores(params, self.eval_set)

    def validate(self, params) -> dict[str, float]:
        """The same metrics on `data.val_split` (the original's validation loop on `val`), never on the test split:
        what `train.eval_every` logs as val/<name> and the best-validation checkpoint selects by."""
        return self.scores(params, self.val_set)

    def selection_metric(self):
        return self.SELECTION

    def text(self, text) -> dict:
        """Token ids and mask of a text (or a text pair) at `data.max_text_len`."""
        enc = tokenize(self.tokenizer, text, self.max_length)
        return {"text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}

    def image_batch(self) -> np.ndarray:
        """Zero images of a global batch, for `init_batch`."""
        return np.zeros((self.global_batch, self.image_size, self.image_size, 3), np.float32)

    def text_batch(self) -> dict:
        """Zero token ids and an all-ones mask of a global batch, for `init_batch`."""
        b, length = self.global_batch, self.max_length
        return {"text_ids": np.zeros((b, length), np.int32), "text_mask": np.ones((b, length), np.int32)}

    def train_data(self):
        return global_batch_dataset(self.train_set, global_batch=self.global_batch, seed=int(self.config.seed),
                                    transform=self.example, process_index=jax.process_index(),
                                    process_count=jax.process_count(), on_bad_example=self.on_bad_example)

    def work_per_example(self) -> tuple[int, str]:
        return (self.image_size // self.model_cfg.patch_size) ** 2 + 1 + self.max_length, "tokens"

    def init_params(self, rng):
        size, m = self.model_cfg.image_size, self.model
        images = jnp.zeros((2, size, size, 3), jnp.float32)
        ids, mask = jnp.zeros((2, self.max_length), jnp.int32), jnp.ones((2, self.max_length), jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        # the modules outside the towers init as the original's init_weights (models/ptunifier.INIT)
        return m.init({"params": params_rng, "dropout": dropout_rng}, images, ids, mask, train=False)["params"]

    def apply(self, params, method, *args, rng: jax.Array, train: bool) -> Any:
        """`method` of the model on `args` with dropout from `rng` (a loss_fn's forward pass)."""
        return self.model.apply({"params": params}, *args, train=train, rngs={"dropout": rng}, method=method)

    def jitted(self, method):
        """jax.jit of (params, *args) -> `method` of the model, for evaluation."""
        return jax.jit(lambda p, *a: self.model.apply({"params": p}, *a, method=method))

    def outputs(self, params, dataset, fn, keys, extra=()) -> tuple[np.ndarray, dict]:
        """Run jitted `fn` on `keys` of every eval batch; (outputs, {extra key: stacked values})."""
        outs, kept = [], {k: [] for k in extra}
        for batch in eval_batches(dataset, self.run.eval_batch_size, self.example):
            valid = batch["valid"]
            outs.append(np.asarray(fn(params, *[batch[k] for k in keys]))[valid])
            for k in extra:
                kept[k].append(batch[k][valid])
        return np.concatenate(outs), {k: np.concatenate(v) for k, v in kept.items()}

    def load_pretrained(self, params, pretrained):
        """A pretraining (or fine-tuning) run's PTUnifier params: every leaf of the same path and shape; a
        position table of another grid resized bicubically to the model's (once, here: the original's
        `adapt_position_encoding`)."""
        pretrained = self.adapt_position_table(params, pretrained)
        merged, skipped = merge_params(params, pretrained)
        missing = [s for s in skipped if not s.startswith(self.NEW_PARAMS)]
        if missing:
            raise MedjaxInputError("init: the checkpoint does not match the model config: " + ", ".join(missing[:8]))
        return merged

    def adapt_position_table(self, params, pretrained):
        """`pretrained` with its `vision/position_embedding` resized to the shape of `params`' (class position
        kept, bicubic; medjax.nn.clip_vit.resize_position_embedding) when the two grids differ."""
        have = pretrained.get("vision", {}).get("position_embedding") if isinstance(pretrained, dict) else None
        want = params.get("vision", {}).get("position_embedding") if isinstance(params, dict) else None
        if have is None or want is None or tuple(np.shape(have)) == tuple(np.shape(want)):
            return pretrained
        tokens, width = np.shape(want)
        grid = int(round((tokens - 1) ** 0.5))
        if grid * grid + 1 != tokens or np.shape(have)[1] != width:
            return pretrained  # not a square-grid table of this width: merge_params reports the mismatch
        resized = np.asarray(resize_position_embedding(jnp.asarray(have, jnp.float32), (grid, grid)), np.asarray(have).dtype)
        self.log(f"init: position table resized {tuple(np.shape(have))} -> {resized.shape} "
                 f"({grid}x{grid} patches + CLS at image size {self.image_size})")
        return dict(pretrained, vision=dict(pretrained["vision"], position_embedding=resized))

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """The paper's layout: the kind's `TABLE` columns, in percent, one group per checkpoint."""
        header = "| Method | " + " | ".join(f"{label} {name}" for label, _ in columns for name, _ in self.TABLE) + " |"
        rule = "|---|" + "---|" * (len(columns) * len(self.TABLE))
        def cell(r, key):  # with the chance level beside it where evaluate gave one (medjax.metrics.chance), and
            chance, blind = r.get(key + "_chance"), r.get(key + "_question_only")  # an image-blind baseline's
            notes = ([f"chance {self.TABLE_SCALE * chance:.2f}"] if chance is not None else []) + (
                [f"question only {self.TABLE_SCALE * blind:.2f}"] if blind is not None else [])
            return f"{self.TABLE_SCALE * r[key]:.2f}" + (f" ({', '.join(notes)})" if notes else "")

        row = f"| medjax {exp} | " + " | ".join(cell(r, key) for _, r in columns for _, key in self.TABLE) + " |"
        return "\n".join([header, rule, row])
