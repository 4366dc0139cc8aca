"""PTUnifier vision-only multi-label classification (Chen et al., ICCV 2023, Sec. 4, classification table;
the original's `mlc_head`): the image with image-selected textual prompts in place of the report,
logits = head(cls(X^v, PT^l)), BCE; macro AUROC and F1 (CheXpert 5 labels, RSNA pneumonia) at a label
fraction (1 / 10 / 100% of the training images: the original's fixed subset files with
`data.train_split=mlc_chexpert_train_01`, or a seeded random `data.label_fraction`).

F1 is micro-averaged over every (image, label) decision, as the original's torchmetrics 0.7
`F1(num_classes)` (whose default average is "micro", threshold: probability >= 0.5); the macro mean over
labels is reported beside it (`f1_macro`)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import f1_score

from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.metrics.chance import AUC_CHANCE
from medjax.metrics.classification import macro_auc
from medjax.tasks.common import Subset, label_fraction_label
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask
from medjax.errors import MedjaxInputError


class PTUnifierClassificationTask(PTUnifierFinetuneTask):
    TABLE = (("AUC", "auc"), ("F1", "f1"), ("F1 macro", "f1_macro"))
    TABLE_SCALE = 100.0  # AUC and F1 are fractions
    SELECTION = ("auc", "max")  # the original's the_metric for `mlc`: the validation AUROC

    def dataset(self, split: str) -> finetune_data.MultiLabelDataset:
        return finetune_data.MultiLabelDataset(self.path(split), finetune_data.row_split(split), label_column=self.config.data.label_column)

    def training_set(self):
        """A seeded random `data.label_fraction` of the training images (the original's 1% / 10% files)."""
        train, fraction = super().training_set(), float(self.config.data.label_fraction)
        return _subset(train, fraction, int(self.config.data.label_seed)) if fraction < 1.0 else train

    def num_outputs(self) -> int:
        if self.train_set.num_labels < 1:
            raise MedjaxInputError(f"{self.path(self.config.data.train_split)}: no labels (classification needs at least one)")
        return self.train_set.num_labels

    def example(self, ex: dict, rng=None) -> dict:
        return {"image": self.image(ex["image"], rng), "labels": ex["labels"]}

    def init_batch(self) -> dict:
        return {"image": self.image_batch(), "labels": np.zeros((self.global_batch, self.model.num_outputs), np.float32)}

    def loss_fn(self, params, batch, rng, train):
        logits = self.apply(params, self.model.image_logits, batch["image"], rng=rng, train=train)
        loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["labels"]).mean()
        return loss, {"mlc_loss": loss}

    @functools.cached_property
    def _logits(self):
        return self.jitted(self.model.image_logits)

    def scores(self, params, dataset) -> dict[str, float]:
        logits, kept = self.outputs(params, dataset, self._logits, ("image",), ("labels",))
        probs, labels = 1 / (1 + np.exp(-logits.astype(np.float64))), kept["labels"]
        return {"auc": macro_auc(labels, probs), **multilabel_f1(labels, probs), "examples": float(len(labels)),
                "auc_chance": AUC_CHANCE}

    def column_label(self, saved_config: dict, path: str) -> str:
        """The run's label fraction ("1%", "10%", "100%"), as the paper's columns; a subset file's split name."""
        split = saved_config.get("data", {}).get("train_split", "train")
        if finetune_data.row_split(split) is None:
            return str(split)
        return label_fraction_label(saved_config) or super().column_label(saved_config, path)


def multilabel_f1(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{"f1": micro F1 (torchmetrics 0.7 `F1` default), "f1_macro": mean of per-label F1} of (N, C) 0/1
    labels and probabilities, a positive prediction being probability >= 0.5 (torchmetrics' threshold)."""
    predicted = np.asarray(probs) >= 0.5
    return {"f1": float(f1_score(labels, predicted, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0))}


def _subset(dataset, fraction: float, seed: int) -> Subset:
    """A seeded random `fraction` of the rows (the original's 1% / 10% CheXpert training files)."""
    if not 0.0 < fraction <= 1.0:
        raise MedjaxInputError(f"data.label_fraction must be in (0, 1], got {fraction}")
    n = len(dataset)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, int(round(fraction * n)))])
    return Subset(dataset, keep)
