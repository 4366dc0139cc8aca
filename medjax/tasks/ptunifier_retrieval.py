"""PTUnifier image<->text retrieval fine-tuning (Chen et al., ICCV 2023, Sec. 4, retrieval table; the
original's `irtr_head`, initialised from the ITM head's "matched" row, so scoring with that row is the
same): s(I, T) = ITM "matched" logit of cls(X^v, X^l), trained with CE over the true text and
`finetune.num_negatives` other texts of the batch (the original: 15 false texts); R@1/5/10 both ways
(ROCO), zero-shot straight from a pretraining checkpoint. `finetune.retrieval_score` = "itm" (the
paper), "itc" (the ITC embeddings' cosine) or "both". Validation (`train.eval_every`) selects by the
original's `val/the_metric` for irtr: ir_r1 + tr_r1 (fractions) minus the validation retrieval loss."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.data.pipelines.global_batches import eval_batches
from medjax.data.readers.image_report import ImageReportDataset, pick_sentence
from medjax.metrics.chance import recall_at_k_chance
from medjax.metrics.retrieval import retrieval_recall
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask
from medjax.errors import MedjaxInputError

SCORES = ("itm", "itc", "both")


class PTUnifierRetrievalTask(PTUnifierFinetuneTask):
    TABLE = (("I2T R@1", "tr_r1"), ("I2T R@5", "tr_r5"), ("I2T R@10", "tr_r10"),
             ("T2I R@1", "ir_r1"), ("T2I R@5", "ir_r5"), ("T2I R@10", "ir_r10"))  # retrieval_recall is in %
    SELECTION = ("the_metric", "max")  # the original's: val ir_r1 + tr_r1 (fractions) - val irtr loss (validate)

    def dataset(self, split: str) -> ImageReportDataset:
        return ImageReportDataset(self.path(split), split=split)

    def num_outputs(self) -> int:
        return 0  # no task head: the ITM head scores the pairs

    def example(self, ex: dict, rng=None) -> dict:
        """Arrays of a pair, or of its image / caption alone (retrieval evaluation encodes them apart)."""
        out = {"image": self.image(ex["image"], rng)} if "image" in ex else {}
        if "caption" in ex:
            out.update(self.text(pick_sentence(ex["caption"], None)))
        return out

    def init_batch(self) -> dict:
        return dict(self.text_batch(), image=self.image_batch())

    def pair_scores(self, params, batch, rng, train) -> jax.Array:
        """(b, 1 + K) ITM "matched" logits of each image with [its own text, K other texts of the batch].
        Unimodal streams are computed once per image and text; only the fusion runs per pair."""
        b, k = batch["image"].shape[0], int(self.config.finetune.num_negatives)
        if not 0 < k < b:
            raise MedjaxInputError(f"finetune.num_negatives={k} must be in [1, train.batch_size - 1 = {b - 1}]")
        neg_rng, dropout_rng = jax.random.split(rng)
        shifts = jax.vmap(lambda key: jax.random.permutation(key, b - 1)[:k] + 1)(jax.random.split(neg_rng, b))
        texts = jnp.concatenate([jnp.arange(b)[:, None], (jnp.arange(b)[:, None] + shifts) % b], 1).reshape(-1)

        def scores(module, images, ids, mask):
            image_tokens = jnp.repeat(module.image_tokens(images, train=train), k + 1, axis=0)
            text_tokens = module.text_tokens(ids, mask, train=train)[texts]
            return module.fused_score(image_tokens, text_tokens, mask[texts], train=train).reshape(b, k + 1)

        return self.model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_mask"],
                                rngs={"dropout": dropout_rng}, method=scores).astype(jnp.float32)

    def loss_fn(self, params, batch, rng, train):
        """CE over [own text, K other texts of the batch] per image, scored by the ITM "matched" logit."""
        s = self.pair_scores(params, batch, rng, train)
        loss = optax.softmax_cross_entropy_with_integer_labels(s, jnp.zeros((s.shape[0],), jnp.int32)).mean()
        return loss, {"irtr_loss": loss, "train_rank1": jnp.mean(jnp.argmax(s, -1) == 0)}

    @functools.cached_property
    def _pair_losses(self):
        """jit of (params, batch, rng) -> the per-image retrieval CE (no dropout), for the validation loss."""
        def losses(params, batch, rng):
            s = self.pair_scores(params, batch, rng, False)
            return optax.softmax_cross_entropy_with_integer_labels(s, jnp.zeros((s.shape[0],), jnp.int32))

        return jax.jit(losses)

    def validation_loss(self, params, dataset) -> float:
        """The retrieval CE over `dataset`'s pairs in batches of train.batch_size with fixed negatives (seed 0;
        the padded rows of the last batch serve as negatives but are not averaged)."""
        total, count, rng = 0.0, 0, jax.random.PRNGKey(0)
        for index, batch in enumerate(eval_batches(dataset, self.global_batch, self.example)):
            valid = batch.pop("valid")
            losses = np.asarray(self._pair_losses(params, batch, jax.random.fold_in(rng, index)), np.float64)
            total, count = total + float(losses[valid].sum()), count + int(valid.sum())
        return total / max(count, 1)

    @functools.cached_property
    def _jit(self):
        m = self.model
        fused = jax.jit(lambda p, image, text, mask: m.apply(
            {"params": p}, jnp.broadcast_to(image, (text.shape[0],) + image.shape), text, mask, method=m.fused_score))
        return {"image_tokens": self.jitted(m.image_tokens), "text_tokens": self.jitted(m.text_tokens),
                "fused": fused, "itc_image": self.jitted(m.itc_image), "itc_text": self.jitted(m.itc_text)}

    def validate(self, params) -> dict[str, float]:
        """R@K on `data.val_split` and the original's `val/the_metric` for irtr: ir_r1 + tr_r1 (as fractions,
        `compute_irtr_recall`) minus the validation retrieval loss (`irtr_loss`)."""
        out = self.scores(params, self.val_set)
        out["irtr_loss"] = self.validation_loss(params, self.val_set)
        recall = "itc_" if "ir_r1" not in out else ""
        out["the_metric"] = (out[f"{recall}ir_r1"] + out[f"{recall}tr_r1"]) / 100.0 - out["irtr_loss"]
        return out

    def scores(self, params, dataset) -> dict[str, float]:
        score = self.config.finetune.retrieval_score
        if score not in SCORES:
            raise MedjaxInputError(f"finetune.retrieval_score={score!r}; expected itm, itc or both")
        j, e, ds = self._jit, self.run.eval_batch_size, dataset
        images, texts = _ImagesOf(ds), _TextsOf(ds)
        text_image = np.array([i for i, _ in ds.index])
        out = {}
        if score in ("itm", "both"):
            image_tokens, _ = self.outputs(params, images, j["image_tokens"], ("image",))
            text_tokens, kept = self.outputs(params, texts, j["text_tokens"], ("text_ids", "text_mask"), ("text_mask",))
            scores = np.zeros((len(image_tokens), len(text_tokens)), np.float32)
            pad = (-len(text_tokens)) % e
            text_tokens = np.concatenate([text_tokens, np.repeat(text_tokens[-1:], pad, 0)])
            masks = np.concatenate([kept["text_mask"], np.repeat(kept["text_mask"][-1:], pad, 0)])
            for i, image in enumerate(image_tokens):
                row = [np.asarray(j["fused"](params, image, text_tokens[s:s + e], masks[s:s + e]))
                       for s in range(0, len(text_tokens), e)]
                scores[i] = np.concatenate(row)[:scores.shape[1]]
            out.update(retrieval_recall(scores, text_image))
        if score in ("itc", "both"):
            image_emb, _ = self.outputs(params, images, j["itc_image"], ("image",))
            text_emb, _ = self.outputs(params, texts, j["itc_text"], ("text_ids", "text_mask"))
            prefix = "itc_" if out else ""
            out.update({prefix + k: v for k, v in retrieval_recall(image_emb @ text_emb.T, text_image).items()})
        num_images, num_texts = len(images), len(text_image)  # chance: a random ranking (medjax.metrics.chance)
        out.update({f"{d}_r{k}_chance": 100.0 * recall_at_k_chance(k, n)
                    for d, n in (("tr", num_texts), ("ir", num_images)) for k in (1, 5, 10)})
        return dict(out, examples=float(len(text_image)))


class _ImagesOf:
    """The distinct images of an image-report set, as examples {"image"} for retrieval evaluation."""

    def __init__(self, ds: ImageReportDataset):
        self.ds = ds

    def __len__(self):
        return self.ds.num_images

    def __getitem__(self, i):
        return {"image": self.ds.load_image(i)}


class _TextsOf:
    """The captions of an image-report set (one per sample), as examples {"caption"}."""

    def __init__(self, ds: ImageReportDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, k):
        i, c = self.ds.index[k]
        return {"caption": self.ds.captions[i][c]}
