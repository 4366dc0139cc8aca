"""MRM pretraining task: fundus image + genotype pairs, L = L_recon + lambda (L_self + L_cross)
(Yang et al., ICCV 2023, Sec. 3.2.4)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from medjax.data.transforms.image import fundus_eval_transform, fundus_train_transform
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.data.verify import image_checks
from medjax.losses.mrm import mrm_loss
from medjax.models import mrm as mrm_lib
from medjax.tasks.base import TaskBase, model_config
from medjax.tasks.common import data_root
from medjax.errors import MedjaxInputError


FIXED_POSITION_TABLE = r"^image_encoder/pos_embed$"


def genotype_chromosomes(data_cfg):
    """`data.chromosomes` as strings (ContIG: 1-22), or None (every SNP of a single file) when empty."""
    chromosomes = data_cfg.get("chromosomes", ()) or ()
    return tuple(str(c) for c in chromosomes) or None


class MRMTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.root = data_root(config.data, log)
        split = config.data.split or None
        self.dataset = self._dataset(split)
        self.model = mrm_lib.mrm_from_config(model_config(config), num_snps=self.dataset.num_snps)

    def optim_config(self):
        """`optim` plus, with `model.pos_embed="sincos"`, the image encoder's position table frozen (MAE keeps
        its sin-cos table fixed: `requires_grad=False`)."""
        optim = self.config.optim
        if str(self.config.model.get("pos_embed", "learned")) != "sincos":
            return optim
        optim = optim.copy_and_resolve_references()
        with optim.unlocked():
            optim.frozen = list(optim.get("frozen", ()) or ()) + [FIXED_POSITION_TABLE]
        return optim

    def work_per_example(self) -> tuple[int, str]:
        """Input tokens of one pair: image patches + class token + genome tokens (for throughput)."""
        m = self.config.model
        return (m.image_size // m.patch_size) ** 2 + 1 + -(-self.dataset.num_snps // m.genome_token_size), "tokens"

    def init_batch(self) -> dict:
        size = self.config.model.image_size
        return {"image": np.zeros((self.global_batch, size, size, 3), np.float32),
                "genome": np.zeros((self.global_batch, self.dataset.num_snps), np.float32)}

    def init_params(self, rng):
        batch = {k: v[:2] for k, v in self.init_batch().items()}  # params do not depend on batch size
        params_rng, dropout_rng = jax.random.split(rng)
        variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                    batch["image"], batch["genome"], train=False)
        return variables["params"]

    def loss_fn(self, params, batch, rng, train):
        outputs = self.model.apply({"params": params}, batch["image"], batch["genome"], train=train,
                                   rngs={"dropout": rng})
        m = self.config.model
        return mrm_loss(outputs, batch["image"], batch["genome"], patch_size=m.patch_size,
                        lam=m.lam, norm_pix_loss=m.norm_pix_loss,
                        relation_similarity=str(m.get("relation_similarity", "cosine")))

    def _train_transform(self, example, rng):
        image = fundus_train_transform(example["image"], rng, rotation=self.config.data.rotation,
                                       hflip=self.config.data.hflip)
        return {"image": image, "genome": example["genome"]}

    def train_data(self):
        return global_batch_dataset(
            self.dataset, global_batch=self.global_batch, seed=int(self.config.seed),
            transform=self._train_transform, process_index=jax.process_index(),
            process_count=jax.process_count(), on_bad_example=self.on_bad_example)

    @functools.cached_property
    def _eval_loss(self):
        def eval_loss(params, batch):
            loss, parts = self.loss_fn(params, batch, jax.random.PRNGKey(0), False)
            return dict(parts, loss=loss)

        return jax.jit(eval_loss)

    @functools.cached_property
    def eval_dataset(self) -> FundusGenomeDataset:
        split = self.config.data.eval_split or None
        if split == (self.config.data.split or None):
            return self.dataset
        return self._dataset(split)

    def _dataset(self, split) -> FundusGenomeDataset:
        d = self.config.data
        dataset = FundusGenomeDataset(self.root, image_size=self.config.model.image_size, snp_stride=d.snp_stride,
                                      split=split, drop_missing_snps=bool(d.drop_missing_snps),
                                      allow_duplicates=bool(d.allow_duplicates), check_images=False,
                                      genotypes=str(d.get("genotypes", "genotypes")),
                                      chromosomes=genotype_chromosomes(d), count_a1=bool(d.get("count_a1", False)),
                                      split_order=str(d.get("split_order", "appearance")))
        self.verify_data(image_checks(dataset.image_paths, dataset.image_wheres))  # data.verify (medjax.data.verify)
        return dataset

    def evaluate(self, params) -> dict[str, float]:
        """Mean loss and its parts (no dropout, no augmentation) over the evaluation rows."""
        dataset = self.eval_dataset
        transform = lambda ex: {"image": fundus_eval_transform(ex["image"]), "genome": ex["genome"]}
        totals, count = {}, 0
        for batch in eval_batches(dataset, self.run.eval_batch_size, transform):
            n = int(batch.pop("valid").sum())
            if n < len(batch["image"]):  # relation matching is a batch statistic: skip a padded tail
                continue
            parts = jax.device_get(self._eval_loss(params, batch))
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
            count += n
        if count == 0:
            raise MedjaxInputError(f"evaluation needs at least train.eval_batch_size={self.run.eval_batch_size} rows")
        return {k: v / count for k, v in totals.items()}

