"""RFMiD multi-label retinal disease classification by fine-tuning a pretrained ViT encoder (MRM transfer, Yang
et al., ICCV 2023, Tab. 1), with ContIG's protocol (HealthML/ContIG `rfmid_retinal_disease_classification.py`,
`data/data_rfmid.py`): 43 labels (Disease_Risk, HR and ODPM dropped), BCEWithLogits (mean), Resize + random
horizontal flip only, the released train / validation / test splits, the checkpoint of the lowest validation loss
tested (`ModelCheckpoint(monitor="valid_loss")`: the task's selection metric, `train.eval_every`).

Metrics on the test split: ROC AUC per label (`auc/<label>`, labels with both classes in the split), their mean
(`auc_macro`) and the AUC of all (image, label) pairs pooled (`auc_micro`, ContIG's torchmetrics
`AUROC(average="micro")`). Label fractions 1% / 10% / 100% draw a seeded random subset of the training images
(`medjax.tasks.fundus_transfer.fraction_subset`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.config import ConfigError
from medjax.data.pipelines.global_batches import eval_batches
from medjax.data.readers.rfmid import RFMiDDataset
from medjax.data.transforms.image import fundus_eval_transform, fundus_train_transform
from medjax.data.verify import image_checks
from medjax.metrics.chance import AUC_CHANCE
from medjax.metrics.classification import roc_auc
from medjax.models.vit_classifier import ViTClassifier
from medjax.tasks.common import Subset, data_root
from medjax.tasks.fundus_classification import FundusClassificationTask
from medjax.tasks.fundus_transfer import FundusTransferTask
from medjax.tasks.fundus_transfer import fraction_subset, transfer_column_label, transfer_table


def multilabel_aucs(labels: np.ndarray, scores: np.ndarray, names) -> dict[str, float]:
    """{"auc_macro", "auc_micro", "auc/<name>" per label with both classes present} of (N, L) labels and scores."""
    per_label = {f"auc/{name}": roc_auc(labels[:, j], scores[:, j]) for j, name in enumerate(names)
                 if 0 < labels[:, j].sum() < len(labels)}
    if not per_label:
        raise ValueError("multilabel_aucs: no label has both positive and negative images in the split")
    return {"auc_macro": float(np.mean(list(per_label.values()))), "auc_micro": roc_auc(labels, scores), **per_label}


class FundusMultiLabelTask(FundusTransferTask):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        m = config.model
        train = self.split_dataset(config.data.train_split)
        if train.num_labels != int(m.num_classes):
            raise ConfigError(f"config model.num_classes={m.num_classes} but {self.root} has {train.num_labels} "
                              f"labels after dropping data.drop_labels={list(config.data.drop_labels)}")
        self.label_names = train.label_names
        self.train_set = Subset(train, fraction_subset(len(train), float(config.data.label_fraction),
                                                       int(config.data.label_seed)))
        self._train_size = len(train)
        self.model = ViTClassifier(
            image_size=m.image_size, patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio, drop_path=m.drop_path, num_classes=int(m.num_classes), pooling=m.pooling,
            remat=m.remat, scan=m.get("scan"), dtype=jnp.dtype(config.dtype))

    @functools.lru_cache(maxsize=4)
    def split_dataset(self, split: str) -> RFMiDDataset:
        dataset = RFMiDDataset(self.root, split, image_size=int(self.config.model.image_size),
                               drop=tuple(self.config.data.drop_labels))
        self.verify_data(image_checks(dataset.image_paths, dataset.image_wheres))
        return dataset

    def work_per_example(self) -> tuple[int, str]:
        return (self.config.model.image_size // self.config.model.patch_size) ** 2 + 1, "tokens"

    def init_batch(self):
        size, labels = self.config.model.image_size, int(self.config.model.num_classes)
        return {"image": np.zeros((self.global_batch, size, size, 3), np.float32),
                "label": np.zeros((self.global_batch, labels), np.float32)}

    def init_params(self, rng):
        return self.model.init({"params": rng}, self.init_batch()["image"][:2], train=False)["params"]

    def loss_fn(self, params, batch, rng, train):
        logits = self.model.apply({"params": params}, batch["image"], train=train, rngs={"dropout": rng})
        loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()  # BCEWithLogitsLoss (mean)
        return loss, {"bce": loss}

    def _train_transform(self, example, rng):
        image = fundus_train_transform(example["image"], rng, rotation=self.config.data.rotation,
                                       hflip=self.config.data.hflip)
        return {"image": image, "label": example["label"]}

    @functools.cached_property
    def _logits(self):
        return jax.jit(lambda params, images: self.model.apply({"params": params}, images, train=False))

    def predict(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N, L), logits (N, L)) over a split."""
        transform = lambda ex: {"image": fundus_eval_transform(ex["image"]), "label": ex["label"]}  # noqa: E731
        labels, logits = [], []
        for batch in eval_batches(self.split_dataset(split), self.run.eval_batch_size, transform):
            logits.append(np.asarray(self._logits(params, batch["image"]))[batch["valid"]])
            labels.append(batch["label"][batch["valid"]])
        return np.concatenate(labels), np.concatenate(logits)

    @staticmethod
    def _bce(labels: np.ndarray, logits: np.ndarray) -> float:
        return float(np.mean(optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))

    def evaluate(self, params) -> dict[str, float]:
        labels, logits = self.predict(params, self.config.data.eval_split)
        scores = 1.0 / (1.0 + np.exp(-logits))
        return {**multilabel_aucs(labels, scores, self.label_names), "loss": self._bce(labels, logits),
                "examples": float(len(labels)), "auc_macro_chance": AUC_CHANCE, "auc_micro_chance": AUC_CHANCE}

    def validate(self, params) -> dict[str, float]:
        """Validation loss (ContIG's selection) and AUCs on `data.val_split`."""
        labels, logits = self.predict(params, self.config.data.val_split)
        scores = 1.0 / (1.0 + np.exp(-logits))
        aucs = multilabel_aucs(labels, scores, self.label_names)
        return {"loss": self._bce(labels, logits), "auc_macro": aucs["auc_macro"], "auc_micro": aucs["auc_micro"]}

    def selection_metric(self):
        return ("loss", "min")  # ContIG: ModelCheckpoint(monitor="valid_loss"), tested at ckpt_path="best"

    load_pretrained = FundusClassificationTask.load_pretrained  # the MRM / MAE image encoder into `encoder`

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """MRM Tab. 1's RFMiD columns: AUC (macro over labels, and ContIG's micro) in percent, a row per label
        fraction, a column per pretraining (per-label AUCs: results.json / results.csv)."""
        return transfer_table("RFMiD", columns, ("auc_macro", "auc_micro"))

    def column_label(self, saved_config: dict, path: str) -> str:
        return transfer_column_label(saved_config, path)

