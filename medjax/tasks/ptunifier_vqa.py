"""PTUnifier medical VQA fine-tuning (Chen et al., ICCV 2023, Sec. 4, VQA table; the original's
`compute_vqa`): image + question -> closed-set answer classification with the head on [tanh(W L_0);
tanh(W V_0)], BCE over the answers (mean over (batch, answers) times the number of answers); open / closed
/ overall accuracy (VQA-RAD, SLAKE, MedVQA-2019)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax

from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.metrics.chance import vqa_chance
from medjax.metrics.vqa import question_only_accuracy, vqa_accuracy
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask
from medjax.errors import MedjaxInputError


class PTUnifierVQATask(PTUnifierFinetuneTask):
    TABLE = (("Open", "open"), ("Closed", "closed"), ("Overall", "overall"))  # vqa_accuracy is in percent
    SELECTION = ("overall", "max")  # the original's the_metric for `vqa`: the validation VQA score (overall)

    def dataset(self, split: str) -> finetune_data.VQADataset:
        """One answer vocabulary over the train and eval JSONL manifests (all their splits); the original's
        Arrow files carry their answer labels (`finetune.num_answers` of them)."""
        path, answers = self.path(split), None
        if not path.endswith(".arrow"):
            train_path, eval_path = self.path(self.config.data.train_split), self.path(self.config.data.eval_split)
            answers = finetune_data.answer_vocabulary(train_path)
            if eval_path != train_path:
                answers += [a for a in finetune_data.answer_vocabulary(eval_path) if a not in answers]
        return finetune_data.VQADataset(path, split, answers=answers, num_answers=int(self.config.finetune.num_answers))

    def num_outputs(self) -> int:
        if self.train_set.num_answers < 1:
            raise MedjaxInputError(f"{self.path(self.config.data.train_split)}: no answers (VQA needs at least one)")
        return self.train_set.num_answers

    def example(self, ex: dict, rng=None) -> dict:
        return dict(self.text(ex["question"]), image=self.image(ex["image"], rng),
                    target=ex["target"], answer_type=ex["answer_type"])

    def init_batch(self) -> dict:
        return dict(self.text_batch(), image=self.image_batch(),
                    target=np.zeros((self.global_batch, self.model.num_outputs), np.float32),
                    answer_type=np.zeros((self.global_batch,), np.int32))

    def loss_fn(self, params, batch, rng, train):
        logits = self.apply(params, self.model.vqa_logits, batch["image"], batch["text_ids"], batch["text_mask"],
                            rng=rng, train=train).astype(jnp.float32)
        # The original: BCE-with-logits mean over (batch, answers), times the number of answers.
        loss = optax.sigmoid_binary_cross_entropy(logits, batch["target"]).mean() * logits.shape[-1]
        hit = jnp.take_along_axis(batch["target"], jnp.argmax(logits, -1)[:, None], -1)[:, 0]
        return loss, {"vqa_loss": loss, "train_vqa_score": hit.mean()}

    @functools.cached_property
    def _logits(self):
        return self.jitted(self.model.vqa_logits)

    def scores(self, params, dataset) -> dict[str, float]:
        logits, kept = self.outputs(params, dataset, self._logits, ("image", "text_ids", "text_mask"),
                                    ("target", "answer_type"))
        return dict(vqa_accuracy(logits, kept["target"], kept["answer_type"]), examples=float(len(logits)),
                    **vqa_chance(kept["target"], kept["answer_type"], logits.shape[1]),
                    **{f"{k}_question_only": v for k, v in self.question_only(dataset).items()})

    def question_only(self, dataset) -> dict[str, float]:
        """{overall, closed, open} of the image-blind baseline (medjax.metrics.vqa.question_only_accuracy): the
        training split's most frequent answer per question text, scored on `dataset`."""
        train, rows = self.train_set.questions, dataset.questions
        scores = question_only_accuracy([q for _, q, _, _ in train], np.stack([t for _, _, t, _ in train]),
                                        np.asarray([k for *_, k in train]), [q for _, q, _, _ in rows],
                                        np.stack([t for _, _, t, _ in rows]), np.asarray([k for *_, k in rows]))
        return {k: scores[k] for k in ("overall", "closed", "open")}
