"""PTUnifier fine-tuning (Chen et al., ICCV 2023, Sec. 4, Tables 1-4): `finetune.kind` picks

* vqa            image + question -> closed-set answer classification, BCE x C (the original's
                 `compute_vqa`); open / closed / overall accuracy (VQA-RAD, SLAKE, MedVQA-2019);
* classification image only (textual prompts stand in for the text) -> multi-label BCE; macro AUROC
                 and F1 (CheXpert 5 labels, RSNA pneumonia) at a label fraction (1 / 10 / 100%);
* retrieval      image <-> text with the ITM "matched" logit as the score, trained with CE over the
                 true text and `num_negatives` other texts of the batch (the original: 15 false texts);
                 R@1/5/10 both ways (ROCO), zero-shot straight from a pretraining checkpoint;
* nli            text pair only (visual prompts stand in for the image) -> 3-way CE; accuracy
                 (RadNLI, trained with MedNLI).
Optimisation as the original: AdamW (0.9, 0.98), wd 0.01 except biases/norms, lr 5e-6 with x`head`
for the heads and x`multi_modal` for the fusion, projections, poolers and prompt pools, linear warmup
over 10% of the steps then linear decay to 0.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import f1_score

from medjax.data import ptunifier_finetune_data as D
from medjax.data.image_report import ImageReportDataset, clip_transform, load_tokenizer, pick_sentence, tokenize
from medjax.data.pipeline import eval_batches, global_batch_dataset
from medjax.data.verify import image_report_checks
from medjax.metrics.classification import accuracy, macro_auc
from medjax.metrics.retrieval import retrieval_recall
from medjax.metrics.vqa import vqa_accuracy
from medjax.models.ptunifier_finetune import KINDS, finetune_model_from_config
from medjax.params import merge_params
from medjax.tasks.base import TaskBase
from medjax.tasks.common import Subset, data_root

class PTUnifierFinetuneTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.kind = config.finetune.kind
        if self.kind not in KINDS:
            raise ValueError(f"finetune.kind={self.kind!r}; expected one of {KINDS}")
        self.root = data_root(config.data, log)
        self.tokenizer = load_tokenizer(config.data.tokenizer or os.path.join(self.root, "tokenizer"))
        self.image_size, self.max_length = int(config.data.image_size), int(config.data.max_text_len)
        self.train_set = self._dataset(config.data.train_split)
        num_outputs = {"vqa": lambda: self.train_set.num_answers, "classification": lambda: self.train_set.num_labels,
                       "nli": lambda: len(D.NLI_LABELS), "retrieval": lambda: 0}[self.kind]()
        if self.kind == "classification" and float(config.data.label_fraction) < 1.0:
            self.train_set = _subset(self.train_set, float(config.data.label_fraction), int(config.data.label_seed))
        log(f"ptunifier fine-tuning ({self.kind}): {len(self.train_set)} training examples")
        self.model_cfg = self._model_config()
        self.model = finetune_model_from_config(self.model_cfg, self.kind, num_outputs, jnp.dtype(config.dtype))

    # ---- data ----------------------------------------------------------------------------------
    def _model_config(self):
        """The `model` block with vocab_size (0 = the tokenizer's size) and the special token ids checked
        against / taken from the tokenizer, as the pretraining task does."""
        cfg, tok = self.config.model.copy_and_resolve_references(), self.tokenizer
        with cfg.unlocked():
            cfg.vocab_size = int(cfg.vocab_size) or len(tok)
            for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
                if getattr(tok, name) is None:
                    raise ValueError(f"the tokenizer has no {name}")
                cfg[name] = int(getattr(tok, name))
        if len(tok) > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tok)} tokens, more than model.vocab_size={cfg.vocab_size}")
        longest = int(self.config.data.max_text_len) + (cfg.pad_token_id + 1 if cfg.roberta_positions else 0)
        if cfg.max_positions < longest:
            raise ValueError(f"model.max_positions={cfg.max_positions} is too small for data.max_text_len="
                             f"{self.config.data.max_text_len} (needs >= {longest})")
        return cfg

    def _path(self, split: str) -> str:
        return D.resolve(self.root, self.config.data.file, split)

    def _dataset(self, split: str):
        """The split's dataset, its images checked at build (data.verify, medjax.data.verify)."""
        dataset = self._read_dataset(split)
        if isinstance(dataset, (D.VQADataset, D.MultiLabelDataset)):  # their images: an ImageReportDataset
            self.verify_data(image_report_checks(dataset.images))
        elif isinstance(dataset, ImageReportDataset):
            self.verify_data(image_report_checks(dataset))
        return dataset

    def _read_dataset(self, split: str):
        path = self._path(split)
        if self.kind == "vqa":
            answers = None
            if not path.endswith(".arrow"):  # one vocabulary over the train and eval manifests (all splits)
                answers = D.answer_vocabulary(self._path(self.config.data.train_split))
                eval_path = self._path(self.config.data.eval_split)
                if eval_path != self._path(self.config.data.train_split):
                    answers += [a for a in D.answer_vocabulary(eval_path) if a not in answers]
            return D.VQADataset(path, split, answers=answers, num_answers=int(self.config.finetune.num_answers))
        if self.kind == "classification":
            return D.MultiLabelDataset(path, split, label_column=self.config.data.label_column)
        if self.kind == "nli":
            return D.NLIDataset(path, split)
        return ImageReportDataset(path, split=split)

    @functools.cached_property
    def eval_set(self):
        return self._dataset(self.config.data.eval_split)

    def _text(self, text) -> dict:
        enc = tokenize(self.tokenizer, text, self.max_length)
        return {"text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}

    def example(self, ex: dict, rng=None) -> dict:
        """Arrays of one example (or of its image / caption alone, for retrieval evaluation); no
        augmentation (the original fine-tunes with the plain `clip` transform)."""
        if self.kind == "nli":
            return dict(self._text((ex["text_a"], ex["text_b"])), label=ex["label"])
        out = {"image": clip_transform(ex["image"], self.image_size)} if "image" in ex else {}
        if self.kind == "vqa":
            out.update(self._text(ex["question"]), target=ex["target"], answer_type=ex["answer_type"])
        elif self.kind == "classification":
            out["labels"] = ex["labels"]
        elif "caption" in ex:
            out.update(self._text(pick_sentence(ex["caption"], None)))
        return out

    def train_data(self):
        return global_batch_dataset(self.train_set, global_batch=self.global_batch, seed=int(self.config.seed),
                                    transform=self.example, process_index=jax.process_index(),
                                    process_count=jax.process_count(), on_bad_example=self.on_bad_example)

    def work_per_example(self) -> tuple[int, str]:
        return (self.image_size // self.model_cfg.patch_size) ** 2 + 1 + self.max_length, "tokens"

    def init_batch(self) -> dict:
        b, s, length = self.global_batch, self.image_size, self.max_length
        image = np.zeros((b, s, s, 3), np.float32)
        text = {"text_ids": np.zeros((b, length), np.int32), "text_mask": np.ones((b, length), np.int32)}
        if self.kind == "nli":
            return dict(text, label=np.zeros((b,), np.int32))
        if self.kind == "classification":
            return {"image": image, "labels": np.zeros((b, self.model.num_outputs), np.float32)}
        if self.kind == "vqa":
            return dict(text, image=image, target=np.zeros((b, self.model.num_outputs), np.float32),
                        answer_type=np.zeros((b,), np.int32))
        return dict(text, image=image)

    def init_params(self, rng):
        size, m = self.model_cfg.image_size, self.model
        images = jnp.zeros((2, size, size, 3), jnp.float32)
        ids, mask = jnp.zeros((2, self.max_length), jnp.int32), jnp.ones((2, self.max_length), jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        return m.init({"params": params_rng, "dropout": dropout_rng}, images, ids, mask, train=False)["params"]

    # ---- training ------------------------------------------------------------------------------
    def loss_fn(self, params, batch, rng, train):
        variables, rngs, m = {"params": params}, {"dropout": rng}, self.model
        if self.kind == "vqa":
            logits = m.apply(variables, batch["image"], batch["text_ids"], batch["text_mask"], train=train,
                             rngs=rngs, method=m.vqa_logits).astype(jnp.float32)
            # The original: BCE-with-logits mean over (batch, answers), times the number of answers.
            loss = optax.sigmoid_binary_cross_entropy(logits, batch["target"]).mean() * logits.shape[-1]
            hit = jnp.take_along_axis(batch["target"], jnp.argmax(logits, -1)[:, None], -1)[:, 0]
            return loss, {"vqa_loss": loss, "train_vqa_score": hit.mean()}
        if self.kind == "classification":
            logits = m.apply(variables, batch["image"], train=train, rngs=rngs, method=m.image_logits)
            loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["labels"]).mean()
            return loss, {"mlc_loss": loss}
        if self.kind == "nli":
            logits = m.apply(variables, batch["text_ids"], batch["text_mask"], train=train, rngs=rngs,
                             method=m.text_logits).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, {"cls_loss": loss, "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        return self._retrieval_loss(params, batch, rng, train)

    def _retrieval_loss(self, params, batch, rng, train):
        """CE over [own text, K other texts of the batch] per image, scored by the ITM "matched" logit.
        Unimodal streams are computed once per image and text; only the fusion runs per pair."""
        b, k = batch["image"].shape[0], int(self.config.finetune.num_negatives)
        if not 0 < k < b:
            raise ValueError(f"finetune.num_negatives={k} must be in [1, train.batch_size - 1 = {b - 1}]")
        neg_rng, dropout_rng = jax.random.split(rng)
        shifts = jax.vmap(lambda key: jax.random.permutation(key, b - 1)[:k] + 1)(jax.random.split(neg_rng, b))
        texts = jnp.concatenate([jnp.arange(b)[:, None], (jnp.arange(b)[:, None] + shifts) % b], 1).reshape(-1)

        def scores(module, images, ids, mask):
            image_tokens = jnp.repeat(module.image_tokens(images, train=train), k + 1, axis=0)
            text_tokens = module.text_tokens(ids, mask, train=train)[texts]
            return module.fused_score(image_tokens, text_tokens, mask[texts], train=train).reshape(b, k + 1)

        s = self.model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_mask"],
                             rngs={"dropout": dropout_rng}, method=scores).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(s, jnp.zeros((b,), jnp.int32)).mean()
        return loss, {"irtr_loss": loss, "train_rank1": jnp.mean(jnp.argmax(s, -1) == 0)}

    # ---- evaluation ----------------------------------------------------------------------------
    @functools.cached_property
    def _jit(self):
        m = self.model
        apply = lambda method: jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=method))  # noqa: E731
        fused = jax.jit(lambda p, image, text, mask: m.apply(
            {"params": p}, jnp.broadcast_to(image, (text.shape[0],) + image.shape), text, mask, method=m.fused_score))
        return {"vqa": apply(m.vqa_logits), "image": apply(m.image_logits), "text": apply(m.text_logits),
                "image_tokens": apply(m.image_tokens), "text_tokens": apply(m.text_tokens), "fused": fused,
                "itc_image": apply(m.itc_image), "itc_text": apply(m.itc_text)}

    def _outputs(self, params, dataset, fn, keys, extra=()) -> tuple[np.ndarray, dict]:
        """Run jitted `fn` on `keys` of every eval batch; (outputs, {extra key: stacked values})."""
        outs, kept = [], {k: [] for k in extra}
        for batch in eval_batches(dataset, self.run.eval_batch_size, self.example):
            valid = batch["valid"]
            outs.append(np.asarray(fn(params, *[batch[k] for k in keys]))[valid])
            for k in extra:
                kept[k].append(batch[k][valid])
        return np.concatenate(outs), {k: np.concatenate(v) for k, v in kept.items()}

    def evaluate(self, params) -> dict[str, float]:
        j, ds = self._jit, self.eval_set
        if self.kind == "vqa":
            logits, kept = self._outputs(params, ds, j["vqa"], ("image", "text_ids", "text_mask"), ("target", "answer_type"))
            return dict(vqa_accuracy(logits, kept["target"], kept["answer_type"]), examples=float(len(logits)))
        if self.kind == "classification":
            logits, kept = self._outputs(params, ds, j["image"], ("image",), ("labels",))
            probs, labels = 1 / (1 + np.exp(-logits.astype(np.float64))), kept["labels"]
            return {"auc": macro_auc(labels, probs),
                    "f1": float(f1_score(labels, probs > 0.5, average="macro", zero_division=0)),
                    "examples": float(len(labels))}
        if self.kind == "nli":
            logits, kept = self._outputs(params, ds, j["text"], ("text_ids", "text_mask"), ("label",))
            return {"accuracy": accuracy(kept["label"], logits.argmax(-1)), "examples": float(len(logits))}
        return self._evaluate_retrieval(params, ds)

    def _evaluate_retrieval(self, params, ds: ImageReportDataset) -> dict[str, float]:
        j, e = self._jit, self.run.eval_batch_size
        images, texts = _ImagesOf(ds), _TextsOf(ds)
        text_image = np.array([i for i, _ in ds.index])
        out = {}
        if self.config.finetune.retrieval_score in ("itm", "both"):
            image_tokens, _ = self._outputs(params, images, j["image_tokens"], ("image",))
            text_tokens, kept = self._outputs(params, texts, j["text_tokens"], ("text_ids", "text_mask"), ("text_mask",))
            scores = np.zeros((len(image_tokens), len(text_tokens)), np.float32)
            pad = (-len(text_tokens)) % e
            text_tokens = np.concatenate([text_tokens, np.repeat(text_tokens[-1:], pad, 0)])
            masks = np.concatenate([kept["text_mask"], np.repeat(kept["text_mask"][-1:], pad, 0)])
            for i, image in enumerate(image_tokens):
                row = [np.asarray(j["fused"](params, image, text_tokens[s:s + e], masks[s:s + e]))
                       for s in range(0, len(text_tokens), e)]
                scores[i] = np.concatenate(row)[:scores.shape[1]]
            out.update(retrieval_recall(scores, text_image))
        if self.config.finetune.retrieval_score in ("itc", "both"):
            image_emb, _ = self._outputs(params, images, j["itc_image"], ("image",))
            text_emb, _ = self._outputs(params, texts, j["itc_text"], ("text_ids", "text_mask"))
            prefix = "itc_" if out else ""
            out.update({prefix + k: v for k, v in retrieval_recall(image_emb @ text_emb.T, text_image).items()})
        if not out:
            raise ValueError(f"finetune.retrieval_score={self.config.finetune.retrieval_score!r}; expected itm, itc or both")
        return dict(out, examples=float(len(text_image)))

    def load_pretrained(self, params, pretrained):
        """A pretraining (or fine-tuning) run's PTUnifier params: every leaf of the same path and shape."""
        merged, skipped = merge_params(params, pretrained)
        missing = [s for s in skipped if not s.startswith("task_head")]
        if missing:
            raise ValueError("init: the checkpoint does not match the model config: " + ", ".join(missing[:8]))
        return merged

    def results_table(self, exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
        """The paper's layouts: VQA Open/Closed/Overall; classification AUC/F1 per label fraction;
        retrieval Image->Text and Text->Image R@1/5/10; NLI accuracy."""
        metrics = {"vqa": [("Open", "open"), ("Closed", "closed"), ("Overall", "overall")],
                   "classification": [("AUC", "auc"), ("F1", "f1")], "nli": [("Accuracy", "accuracy")],
                   "retrieval": [("I2T R@1", "tr_r1"), ("I2T R@5", "tr_r5"), ("I2T R@10", "tr_r10"),
                                 ("T2I R@1", "ir_r1"), ("T2I R@5", "ir_r5"), ("T2I R@10", "ir_r10")]}[self.kind]
        scale = 100.0 if self.kind in ("classification", "nli") else 1.0  # vqa / retrieval are already in %
        header = "| Method | " + " | ".join(f"{label} {name}" for label, _ in columns for name, _ in metrics) + " |"
        rule = "|---|" + "---|" * (len(columns) * len(metrics))
        row = f"| medjax {exp} | " + " | ".join(f"{scale * r[key]:.2f}" for _, r in columns for _, key in metrics) + " |"
        return "\n".join([header, rule, row])


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


def _subset(dataset, fraction: float, seed: int) -> Subset:
    """A seeded random `fraction` of the rows (the original's 1% / 10% CheXpert training files)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    n = len(dataset)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, int(round(fraction * n)))])
    return Subset(dataset, keep)
