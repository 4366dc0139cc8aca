"""The MAE baseline of the MRM paper's comparison (Yang et al., ICCV 2023, Tab. 1 "MAE"): the authors'
plain MAE (medjax/models/mrm_mae.py) pretrained on the same fundus images as MRM, without genotypes;
loss = per-patch-normalised MSE over the 75% masked patches (MAE `forward_loss`)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.transforms.image import fundus_eval_transform, fundus_train_transform
from medjax.data.verify import image_checks
from medjax.losses.reconstruction import masked_image_mse
from medjax.models.mrm_mae import MAE
from medjax.tasks.base import TaskBase
from medjax.tasks.mrm import FIXED_POSITION_TABLE
from medjax.tasks.common import data_root
from medjax.errors import MedjaxInputError

MODEL_KEYS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "mask_ratio", "decoder_width",
              "decoder_depth", "decoder_heads", "pos_embed", "remat", "scan")


class MRMMAETask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        self.dataset = self._dataset(config.data.split or None)
        m = config.model
        self.model = MAE(**{k: m[k] for k in MODEL_KEYS if k in m}, dtype=np.dtype(config.dtype))

    def _dataset(self, split) -> FundusGenomeDataset:
        d = self.config.data
        dataset = FundusGenomeDataset(self.root, image_size=self.config.model.image_size, genotypes=None, split=split,
                                      allow_duplicates=bool(d.allow_duplicates), check_images=False,
                                      split_order=str(d.get("split_order", "appearance")))
        self.verify_data(image_checks(dataset.image_paths, dataset.image_wheres))
        return dataset

    def work_per_example(self) -> tuple[int, str]:
        m = self.config.model
        return (m.image_size // m.patch_size) ** 2 + 1, "tokens"

    def init_batch(self) -> dict:
        size = self.config.model.image_size
        return {"image": np.zeros((self.global_batch, size, size, 3), np.float32)}

    def init_params(self, rng):
        params_rng, masking_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "masking": masking_rng}, self.init_batch()["image"][:2],
                               train=False)["params"]

    def loss_fn(self, params, batch, rng, train):
        masking_rng, dropout_rng = jax.random.split(rng)
        out = self.model.apply({"params": params}, batch["image"], train=train,
                               rngs={"masking": masking_rng, "dropout": dropout_rng})
        loss = masked_image_mse(out["pred"], batch["image"], self.config.model.patch_size,
                                norm_pix_loss=bool(self.config.model.norm_pix_loss), patch_mask=out["mask"])
        return loss, {"recon_image": loss}

    def optim_config(self):
        """`optim` plus the fixed sin-cos encoder table frozen (as MRM's, `model.pos_embed="sincos"`)."""
        optim = self.config.optim
        if str(self.config.model.get("pos_embed", "sincos")) != "sincos":
            return optim
        optim = optim.copy_and_resolve_references()
        with optim.unlocked():
            optim.frozen = list(optim.get("frozen", ()) or ()) + [FIXED_POSITION_TABLE]
        return optim

    def _train_transform(self, example, rng):
        return {"image": fundus_train_transform(example["image"], rng, rotation=self.config.data.rotation,
                                                hflip=self.config.data.hflip)}

    def train_data(self):
        return global_batch_dataset(self.dataset, global_batch=self.global_batch, seed=int(self.config.seed),
                                    transform=self._train_transform, process_index=jax.process_index(),
                                    process_count=jax.process_count(), on_bad_example=self.on_bad_example)

    @functools.cached_property
    def _eval_loss(self):
        return jax.jit(lambda params, batch: self.loss_fn(params, batch, jax.random.PRNGKey(0), False)[0])

    def evaluate(self, params) -> dict[str, float]:
        """Masked-patch MSE (fixed masking seed) over the evaluation rows."""
        split = self.config.data.eval_split or None
        dataset = self.dataset if split == (self.config.data.split or None) else self._dataset(split)
        total, count = 0.0, 0
        for batch in eval_batches(dataset, self.run.eval_batch_size, lambda ex: {"image": fundus_eval_transform(ex["image"])}):
            valid = batch.pop("valid")
            if valid.sum() < len(valid):
                continue  # a padded tail would count its padding
            total += float(self._eval_loss(params, batch)) * len(valid)
            count += len(valid)
        if not count:
            raise MedjaxInputError(f"evaluation needs at least train.eval_batch_size={self.run.eval_batch_size} rows")
        return {"recon_image": total / count, "examples": float(count)}
