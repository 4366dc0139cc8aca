"""PTUnifier language-only natural language inference (Chen et al., ICCV 2023, Sec. 4, NLI table; the
original's `cls_head`): the premise/hypothesis pair with text-selected visual prompts in place of the
image, logits = head(cls(PT^v, X^l)), 3-way CE; accuracy (RadNLI, trained with MedNLI)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax

from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.metrics.chance import majority_fraction
from medjax.metrics.classification import accuracy
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask


class PTUnifierNLITask(PTUnifierFinetuneTask):
    TABLE = (("Accuracy", "accuracy"),)
    TABLE_SCALE = 100.0  # accuracy is a fraction
    SELECTION = ("accuracy", "max")  # the original's the_metric for `cls`: validation accuracy

    def dataset(self, split: str) -> finetune_data.NLIDataset:
        return finetune_data.NLIDataset(self.path(split), split)

    def num_outputs(self) -> int:
        return len(finetune_data.NLI_LABELS)

    def example(self, ex: dict, rng=None) -> dict:
        return dict(self.text((ex["text_a"], ex["text_b"])), label=ex["label"])

    def init_batch(self) -> dict:
        return dict(self.text_batch(), label=np.zeros((self.global_batch,), np.int32))

    def loss_fn(self, params, batch, rng, train):
        logits = self.apply(params, self.model.text_logits, batch["text_ids"], batch["text_mask"],
                            rng=rng, train=train).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"cls_loss": loss, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    @functools.cached_property
    def _logits(self):
        return self.jitted(self.model.text_logits)

    def scores(self, params, dataset) -> dict[str, float]:
        logits, kept = self.outputs(params, dataset, self._logits, ("text_ids", "text_mask"), ("label",))
        return {"accuracy": accuracy(kept["label"], logits.argmax(-1)), "examples": float(len(logits)),
                "accuracy_chance": majority_fraction(kept["label"])}
