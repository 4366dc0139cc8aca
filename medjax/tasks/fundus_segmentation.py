"""PALM optic disc + atrophy segmentation by fine-tuning a pretrained ViT encoder under ContIG's ResNet-50 U-Net
head (MRM transfer, Yang et al., ICCV 2023, Tab. 1; medjax/models/vit_unet.py), with ContIG's protocol
(HealthML/ContIG `palm_myopia_segmentation.py`, `data/data_palm.py`): two sigmoid output channels (disc,
atrophy), loss 0.2 BCE + 0.8 soft Dice pooled over the batch (`medjax.losses.segmentation.pooled_bce_dice`; the
config's `loss` block: `bce_weight`, `dice_weight`, `dice` = "pooled" as ContIG or "per_class", each structure's
Dice averaged),
Resize only (no augmentation), the stratified 60/20/20 split of `medjax.data.readers.palm`, the checkpoint of the
lowest validation loss tested (`ModelCheckpoint(monitor="valid_loss")`: the task's selection metric).

BatchNorm's running averages live in the params tree under `batch_stats` (the trainer's state holds one tree):
frozen for the optimizer, replaced after every step by the averages the training forward pass computed
(`post_update`), used as running averages at evaluation.

Metrics on the test split: Dice per structure of the thresholded (> 0.5) masks pooled over the split
(`dice_disc`, `dice_atrophy`, their mean `dice`) and ContIG's `test_dice` (soft probabilities, both structures
pooled: `dice_contig`). Label fractions draw a seeded random subset of the training images.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medjax.data.pipelines.global_batches import eval_batches
from medjax.data.readers.palm import STRUCTURES, PALMDataset
from medjax.data.transforms.image import normalize_imagenet
from medjax.data.verify import image_checks
from medjax.losses.segmentation import pooled_bce_dice
from medjax.metrics.chance import fixed_mask_dice_chance
from medjax.metrics.segmentation import pooled_dice
from medjax.models.vit_unet import ViTUNet
from medjax.tasks.common import Subset, data_root
from medjax.tasks.fundus_transfer import FundusTransferTask, fraction_subset, transfer_column_label, transfer_table

BATCH_STATS = "batch_stats"


class FundusSegmentationTask(FundusTransferTask):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        train = self.split_dataset(config.data.train_split)
        self.train_set = Subset(train, fraction_subset(len(train), float(config.data.label_fraction),
                                                       int(config.data.label_seed)))
        self._train_size = len(train)
        m = config.model
        self.model = ViTUNet(
            num_classes=len(STRUCTURES), image_size=m.image_size, patch_size=m.patch_size, width=m.width,
            depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, drop_path=m.drop_path,
            widths=tuple(m.decoder_widths), remat=m.remat, scan=m.get("scan"), dtype=jnp.dtype(config.dtype))
        loss = config.get("loss") or {}
        self._loss = functools.partial(pooled_bce_dice, bce_weight=float(loss.get("bce_weight", 0.2)),
                                       dice_weight=float(loss.get("dice_weight", 0.8)),
                                       dice=str(loss.get("dice", "pooled")))

    @functools.lru_cache(maxsize=4)
    def split_dataset(self, split: str) -> PALMDataset:
        d = self.config.data
        dataset = PALMDataset(self.root, split, image_size=int(self.config.model.image_size),
                              train_fraction=float(d.train_fraction), val_fraction=float(d.val_fraction))
        self.verify_data(image_checks(dataset.image_paths + dataset.disc_paths,
                                      dataset.image_wheres + dataset.image_wheres))
        return dataset

    def optim_config(self):
        """`optim` plus BatchNorm's running averages frozen (they are set by `post_update`, not trained)."""
        optim = self.config.optim.copy_and_resolve_references()
        with optim.unlocked():
            optim.frozen = list(optim.get("frozen", ()) or ()) + [f"^{BATCH_STATS}/"]
        return optim

    def work_per_example(self) -> tuple[int, str]:
        return self.config.model.image_size ** 2, "pixels"

    def init_batch(self):
        size = self.config.model.image_size
        return {"image": np.zeros((self.global_batch, size, size, 3), np.float32),
                "mask": np.zeros((self.global_batch, size, size, len(STRUCTURES)), np.float32)}

    def init_params(self, rng):
        variables = self.model.init({"params": rng}, self.init_batch()["image"][:2], train=False)
        return {"model": variables["params"], BATCH_STATS: variables[BATCH_STATS]}

    def _variables(self, params):
        return {"params": params["model"], BATCH_STATS: params[BATCH_STATS]}

    def loss_fn(self, params, batch, rng, train):
        if train:
            logits, updated = self.model.apply(self._variables(params), batch["image"], train=True,
                                               rngs={"dropout": rng}, mutable=[BATCH_STATS])
        else:
            logits, updated = self.model.apply(self._variables(params), batch["image"], train=False), None
        loss, parts = self._loss(logits, batch["mask"])
        metrics = dict(parts)
        if updated is not None:
            metrics[BATCH_STATS] = updated[BATCH_STATS]  # consumed by post_update
        return loss, metrics

    def post_update(self, params, metrics, step):
        """The running averages of this step's training forward pass replace the old ones."""
        metrics = dict(metrics)
        stats = metrics.pop(BATCH_STATS, None)
        return (params if stats is None else dict(params, **{BATCH_STATS: stats})), metrics

    def _train_transform(self, example, rng):
        return {"image": normalize_imagenet(example["image"]), "mask": example["mask"]}  # ContIG: no augmentation

    @functools.cached_property
    def _probs_and_loss(self):
        def run(params, images, masks):
            logits = self.model.apply(self._variables(params), images, train=False)
            return jax.nn.sigmoid(logits), self._loss(logits, masks)[0]

        return jax.jit(run)

    def predict(self, params, split: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(masks (N, H, W, 2), probabilities (N, H, W, 2), mean batch loss) over a split."""
        transform = lambda ex: {"image": normalize_imagenet(ex["image"]), "mask": ex["mask"]}  # noqa: E731
        masks, probs, losses = [], [], []
        for batch in eval_batches(self.split_dataset(split), self.run.eval_batch_size, transform):
            valid = batch["valid"]
            p, loss = self._probs_and_loss(params, batch["image"], batch["mask"])
            probs.append(np.asarray(p)[valid])
            masks.append(batch["mask"][valid])
            losses.append(float(loss))  # padded rows repeat the last image: a slight overweight, validation only
        return np.concatenate(masks), np.concatenate(probs), float(np.mean(losses))

    def _dice(self, masks, probs) -> dict[str, float]:
        predicted = probs > 0.5
        scores = {f"dice_{name}": pooled_dice(predicted[..., c], masks[..., c] > 0.5)
                  for c, name in enumerate(STRUCTURES)}
        scores["dice"] = float(np.nanmean(list(scores.values())))
        scores["dice_contig"] = pooled_dice(probs, masks)  # ContIG's test_dice: soft, both structures
        return scores

    def evaluate(self, params) -> dict[str, float]:
        masks, probs, loss = self.predict(params, self.config.data.eval_split)
        # beside each Dice in the table: the best fixed mask's (an input-blind segmenter, medjax.metrics.chance)
        chance = {f"dice_{name}_chance": fixed_mask_dice_chance(masks[..., c]) for c, name in enumerate(STRUCTURES)}
        chance["dice_chance"] = float(np.nanmean(list(chance.values())))
        return {**self._dice(masks, probs), "loss": loss, "examples": float(len(masks)), **chance}

    def validate(self, params) -> dict[str, float]:
        masks, probs, loss = self.predict(params, self.config.data.val_split)
        return {"loss": loss, **self._dice(masks, probs)}

    def selection_metric(self):
        return ("loss", "min")  # ContIG: ModelCheckpoint(monitor="valid_loss"), tested at ckpt_path="best"

    def load_pretrained(self, params, pretrained):
        """The ViT encoder of an MRM / MAE pretraining run (`image_encoder`) or of a fine-tuned classifier
        (`encoder`) into `model/encoder`; the decoder and BatchNorm statistics start fresh."""
        encoder = self.merge_encoder(params["model"]["encoder"], self.pretrained_encoder(pretrained))
        return dict(params, model=dict(params["model"], encoder=encoder))

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """MRM Tab. 1's PALM columns: Dice in percent (per structure and their mean), a row per label fraction,
        a column per pretraining."""
        return transfer_table("PALM", columns, ("dice", "dice_disc", "dice_atrophy"))

    def column_label(self, saved_config: dict, path: str) -> str:
        return transfer_column_label(saved_config, path)

