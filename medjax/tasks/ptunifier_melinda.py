"""PTUnifier image + text single-label classification on MELINDA (Chen et al., ICCV 2023, Sec. 4, Table 4;
the original's `compute_cls` with neither `vision_only` nor `language_only`): figure and caption through the
full two-stream path, logits = head([tanh(W L_0); tanh(W V_0)]), cross-entropy over the method classes;
top-1 accuracy (validation on `val` selects the best checkpoint with `train.eval_every`, as the original's
`val/the_metric`). Label sets (the original's `label_size`): i_meth 85, p_meth 45, i_meth_label 15,
p_meth_label 7."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax

from medjax.errors import MedjaxInputError
from medjax.metrics.chance import majority_fraction
from medjax.metrics.classification import accuracy
from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask


class PTUnifierMelindaTask(PTUnifierFinetuneTask):
    TABLE = (("Accuracy", "accuracy"),)
    TABLE_SCALE = 100.0  # accuracy is a fraction
    SELECTION = ("accuracy", "max")  # the original's the_metric for `cls`: validation accuracy

    def dataset(self, split: str) -> finetune_data.ImageTextLabelDataset:
        return finetune_data.ImageTextLabelDataset(self.path(split), finetune_data.row_split(split),
                                                   label_column=str(self.config.data.label_column))

    def num_outputs(self) -> int:
        """`finetune.num_classes` (the original's label_size), or with 0 the classes the training file has."""
        found, given = self.train_set.num_classes, int(self.config.finetune.num_classes)
        if given and found > given:
            raise MedjaxInputError(f"{self.path(self.config.data.train_split)}: field {self.config.data.label_column!r} "
                                   f"has {found} classes, more than finetune.num_classes={given}")
        return given or found

    def example(self, ex: dict, rng=None) -> dict:
        return dict(self.text(ex["caption"]), image=self.image(ex["image"], rng), label=ex["label"])

    def init_batch(self) -> dict:
        return dict(self.text_batch(), image=self.image_batch(), label=np.zeros((self.global_batch,), np.int32))

    def loss_fn(self, params, batch, rng, train):
        logits = self.apply(params, self.model.joint_logits, batch["image"], batch["text_ids"], batch["text_mask"],
                            rng=rng, train=train).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"cls_loss": loss, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    @functools.cached_property
    def _logits(self):
        return self.jitted(self.model.joint_logits)

    def scores(self, params, dataset) -> dict[str, float]:
        logits, kept = self.outputs(params, dataset, self._logits, ("image", "text_ids", "text_mask"), ("label",))
        return {"accuracy": accuracy(kept["label"], logits.argmax(-1)), "examples": float(len(logits)),
                "accuracy_chance": majority_fraction(kept["label"])}
