"""Fundus grading by fine-tuning a ViT encoder (MRM transfer, Yang et al., ICCV 2023, Tab. 1).

APTOS 2019 exactly as ContIG (the authors' downstream loader): 5 diabetic-retinopathy grades as 5
cumulative outputs (grade g -> [1]*(g+1) + [0]*(4-g), the first always on), BCE; predicted grade =
(sigmoid > 0.5).sum() - 1 over the 5 outputs (`medjax.metrics.classification.contig_grade`, the one helper
used for the training accuracy and for evaluation; `contig_grade_targets` the targets of the training loss and of
the validation BCE); quadratic-weighted kappa and accuracy from it, AUC
(an addition) from the class probabilities of outputs 2..5 read as P(grade >= g).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.data.transforms.image import fundus_eval_transform, fundus_train_transform
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.pipelines.global_batches import eval_batches
from medjax.data.verify import image_checks
from medjax.metrics.chance import AUC_CHANCE, KAPPA_CHANCE, majority_fraction
from medjax.metrics.classification import (accuracy, contig_grade, contig_grade_targets, macro_auc,
                                           quadratic_weighted_kappa)
from medjax.models.vit_classifier import ViTClassifier
from medjax.tasks.base import markdown_table
from medjax.tasks.common import Subset, data_root, label_fraction_label
from medjax.tasks.fundus_transfer import FundusTransferTask
from medjax.errors import MedjaxInputError


def label_subset(labels: np.ndarray, fraction: float, seed: int, num_classes: int) -> np.ndarray:
    """Indices of a stratified `fraction` of the rows (at least one per present class), seeded."""
    if not 0.0 < fraction <= 1.0:
        raise MedjaxInputError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows):
            chosen.append(rng.choice(rows, max(1, int(round(fraction * len(rows)))), replace=False))
    return np.sort(np.concatenate(chosen))


def ordinal_class_probs(logits: jax.Array) -> jax.Array:
    """P(grade = g) from cumulative P(grade >= g), g = 1..K-1 (monotone by a running minimum)."""
    cumulative = jax.lax.cummin(jax.nn.sigmoid(logits.astype(jnp.float32)), axis=logits.ndim - 1)
    ones = jnp.ones(cumulative.shape[:-1] + (1,), cumulative.dtype)
    upper = jnp.concatenate([ones, cumulative], -1)
    lower = jnp.concatenate([cumulative, jnp.zeros_like(ones)], -1)
    return upper - lower


class FundusClassificationTask(FundusTransferTask):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        self.num_classes = int(config.model.num_classes)
        size = config.model.image_size
        train = FundusGenomeDataset(self.root, image_size=size, genotypes=None, label_arity=1,
                                    split=config.data.train_split, allow_duplicates=bool(config.data.allow_duplicates),
                                    check_images=False, num_classes=self.num_classes)
        self.verify_data(image_checks(train.image_paths, train.image_wheres))  # data.verify (medjax.data.verify)
        keep = label_subset(np.asarray(train.labels), float(config.data.label_fraction),
                            int(config.data.label_seed), self.num_classes)
        self.train_set = Subset(train, keep)
        self._train_size = len(train)
        m = config.model
        self.model = ViTClassifier(
            image_size=m.image_size, patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio, drop_path=m.drop_path, num_classes=self.num_classes, pooling=m.pooling,
            remat=m.remat, scan=m.get("scan"),
            dtype=jnp.dtype(config.dtype))

    def work_per_example(self) -> tuple[int, str]:
        """Image patches + class token (for throughput)."""
        return (self.config.model.image_size // self.config.model.patch_size) ** 2 + 1, "tokens"

    def init_batch(self):
        size = self.config.model.image_size
        return {"image": np.zeros((self.global_batch, size, size, 3), np.float32),
                "label": np.zeros((self.global_batch,), np.int32)}

    def init_params(self, rng):
        return self.model.init({"params": rng}, self.init_batch()["image"][:2], train=False)["params"]

    def loss_fn(self, params, batch, rng, train):
        logits = self.model.apply({"params": params}, batch["image"], train=train, rngs={"dropout": rng})
        targets = contig_grade_targets(batch["label"], self.num_classes)  # the tested helper, traced
        loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).mean()
        grade = contig_grade(jax.nn.sigmoid(logits.astype(jnp.float32)))
        return loss, {"bce": loss, "train_accuracy": jnp.mean(grade == batch["label"])}

    def _train_transform(self, example, rng):
        image = fundus_train_transform(example["image"], rng, rotation=self.config.data.rotation,
                                       hflip=self.config.data.hflip)
        return {"image": image, "label": np.int32(example["label"])}

    @functools.cached_property
    def _predict(self):
        """(sigmoid of the K outputs, class probabilities) of a batch of images."""
        def predict(params, images):
            logits = self.model.apply({"params": params}, images, train=False).astype(jnp.float32)
            return jax.nn.sigmoid(logits), ordinal_class_probs(logits[:, 1:])

        return jax.jit(predict)

    @functools.lru_cache(maxsize=4)
    def split_dataset(self, split: str) -> FundusGenomeDataset:
        dataset = FundusGenomeDataset(self.root, image_size=self.config.model.image_size, genotypes=None,
                                      label_arity=1, split=split, allow_duplicates=bool(self.config.data.allow_duplicates),
                                      check_images=False, num_classes=self.num_classes)
        self.verify_data(image_checks(dataset.image_paths, dataset.image_wheres))
        return dataset

    def predict(self, params, split: str, with_loss: bool = False):
        """(labels, predicted grades (`contig_grade`), class probabilities (N, num_classes)[, mean BCE of the
        cumulative targets]) over a split."""
        dataset = self.split_dataset(split)
        transform = lambda ex: {"image": fundus_eval_transform(ex["image"]), "label": np.int32(ex["label"])}
        labels, grades, probs, sigmoids = [], [], [], []
        for batch in eval_batches(dataset, self.run.eval_batch_size, transform):
            valid = batch["valid"]
            sigmoid, class_probs = (np.asarray(a)[valid] for a in self._predict(params, batch["image"]))
            grades.append(contig_grade(sigmoid))
            probs.append(class_probs)
            sigmoids.append(sigmoid)
            labels.append(batch["label"][valid])
        labels = np.concatenate(labels)
        out = (labels, np.concatenate(grades), np.concatenate(probs))
        if not with_loss:
            return out
        p = np.clip(np.concatenate(sigmoids).astype(np.float64), 1e-7, 1 - 1e-7)
        targets = contig_grade_targets(labels, self.num_classes)
        return out + (float(np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))),)

    def evaluate(self, params) -> dict[str, float]:
        labels, grades, probs = self.predict(params, self.config.data.eval_split)
        onehot = np.eye(self.num_classes)[labels]
        return {
            "auc": macro_auc(onehot, probs),
            "kappa": quadratic_weighted_kappa(labels, grades, self.num_classes),
            "accuracy": accuracy(labels, grades),
            "examples": float(len(labels)),
            # beside each number in the table: what an input-blind grader scores (medjax.metrics.chance)
            "auc_chance": AUC_CHANCE, "kappa_chance": KAPPA_CHANCE, "accuracy_chance": majority_fraction(labels),
        }

    def validate(self, params) -> dict[str, float]:
        """Validation BCE (ContIG's selection: `ModelCheckpoint(monitor="valid_loss")`), kappa and accuracy on
        `data.val_split`."""
        labels, grades, probs, loss = self.predict(params, self.config.data.val_split, with_loss=True)
        return {"loss": loss, "kappa": quadratic_weighted_kappa(labels, grades, self.num_classes),
                "accuracy": accuracy(labels, grades)}

    def selection_metric(self):
        return ("loss", "min")

    def load_pretrained(self, params, pretrained):
        """The ViT encoder of an MRM pretraining run (`image_encoder`) or of a classifier (`encoder`)."""
        return dict(params, encoder=self.merge_encoder(params["encoder"], self.pretrained_encoder(pretrained)))

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """MRM Tab. 1's metrics: AUC, kappa and accuracy in percent."""
        return markdown_table(exp, columns, percent=("auc", "kappa", "accuracy"))

    def column_label(self, saved_config: dict, path: str) -> str:
        """The run's label fraction ("1%", "10%", "100%"), as MRM Tab. 1's columns."""
        return label_fraction_label(saved_config) or super().column_label(saved_config, path)
