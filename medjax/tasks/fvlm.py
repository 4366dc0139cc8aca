"""fVLM pretraining on CT-RATE (Shui et al., ICLR 2025): organ-level soft-target image-report contrast
(`medjax.losses.organ_contrastive.fvlm_organ_loss`, summed over the organs), the model of
`medjax.models.fvlm`, the data of `medjax.tasks.fvlm_data`.

Batch (global): volumes (B, D, H, W, 1), masks (B, D, H, W) int32, input_ids / attention_mask (B, organs, T),
normal / intact (B, organs) bool, text_ids (B, organs) int32. The temperature `temp` is a learned divisor,
clamped to [loss.min_temperature, loss.max_temperature] after every step (`post_update`; the original clamps
it in place at the start of each forward, the same values).

Evaluation (`evaluate`, the CT-RATE zero-shot protocol): per label of `eval.labels` (CSV column, organ,
prompt name), the organ's embedding of each scan's centre crop against the prompts "Not <name>." and
"<name>."; score = softmax([v.t_neg, v.t_pos] / temp)[1]; AUC, then accuracy, sensitivity, specificity,
weighted F1 and precision at the top-left ROC threshold (`medjax.metrics.roc_threshold`), macro over the
labels that have both classes in the split, each beside its input-blind level (`label_chance`). Scans whose organ is not intact in the crop are skipped for
that label (the original's under-90%-complete rule, stricter: our choice for a single window).
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.data import demo as demo_lib
from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.data.readers.image_report import load_tokenizer, tokenize
from medjax.losses.organ_contrastive import organ_losses, organ_target_entropy
from medjax.metrics.chance import AUC_CHANCE, CHANCE_SUFFIX, majority_fraction, weighted_f1_chance
from medjax.metrics.roc_threshold import binary_metrics
from medjax.models import fvlm as fvlm_lib
from medjax.params import merge_params
from medjax.tasks.base import TaskBase
from medjax.tasks.common import report_encoder
from medjax.tasks.fvlm_data import CTReportDataset, FVLMExample
from medjax.errors import MedjaxInputError

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "weighted_f1", "precision")
CHANCE_METRICS = ("auc", "accuracy", "weighted_f1", "precision")  # those with an input-blind level in the table


def label_chance(labels: np.ndarray) -> dict[str, float]:
    """One label's input-blind levels (medjax.metrics.chance): AUC 0.5; accuracy and weighted F1 of always
    predicting the majority class; precision of a random positive call = the prevalence."""
    y = np.asarray(labels).astype(np.int64)
    return {"auc" + CHANCE_SUFFIX: AUC_CHANCE, "accuracy" + CHANCE_SUFFIX: majority_fraction(y),
            "weighted_f1" + CHANCE_SUFFIX: weighted_f1_chance(y), "precision" + CHANCE_SUFFIX: float(y.mean())}


class FVLMTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        d, m = config.data, config.model
        self.root = d.dir or demo_lib.ensure_demo("ct_reports", log=log)
        self.tokenizer = load_tokenizer(d.tokenizer or os.path.join(self.root, "tokenizer"))
        self.organs = tuple(d.organs)
        self.crop_shape = tuple(int(s) for s in d.crop_shape)
        dtype = jnp.dtype(config.dtype)
        self.text_init = m.get("init_text", "")
        text, self._text_variables = report_encoder(m, self.tokenizer, dtype, d.tokenizer or self.root)
        self.model = self.build_model(text, dtype)

    def build_model(self, text, dtype):
        """The image-report model around the text tower (a subclass swaps the vision side: ViSD-Boost)."""
        m = self.config.model
        vision = fvlm_lib.volume_vit_from_config(m, self.crop_shape, dtype)
        return fvlm_lib.FVLM(vision, text, num_organs=len(self.organs), pool_heads=m.pool_heads,
                             embed_dim=m.embed_dim, init_temperature=self.config.loss.init_temperature, dtype=dtype)

    # ---- shapes ------------------------------------------------------------------------------------------
    def work_per_example(self):
        return int(np.prod(self.crop_shape)), "voxels"

    def init_batch(self) -> dict:
        b, o, t = self.global_batch, len(self.organs), int(self.config.data.max_length)
        return {"volumes": np.zeros((b,) + self.crop_shape + (1,), np.float32),
                "masks": np.zeros((b,) + self.crop_shape, np.int32),
                "input_ids": np.zeros((b, o, t), np.int32), "attention_mask": np.ones((b, o, t), np.int32),
                "normal": np.ones((b, o), bool), "intact": np.ones((b, o), bool), "text_ids": np.zeros((b, o), np.int32)}

    def init_params(self, rng):
        batch = {k: jnp.asarray(v[:1]) for k, v in self.init_batch().items()}
        return self.model.init({"params": rng, "dropout": rng}, batch["volumes"], batch["masks"], batch["input_ids"],
                               batch["attention_mask"])["params"]

    def initial_params(self, params):
        """The text tower from `model.init_text` (a local Hugging Face BERT directory: CXR-BERT in the paper)."""
        if self._text_variables is None:
            return params
        merged, report = merge_params(params["text"], self._text_variables["params"])
        self.log(f"text encoder from {self.text_init}: {report}")
        return dict(params, text=merged)

    def load_pretrained(self, params, pretrained):
        """`init=` params over the fresh ones; a text tower from `model.init_text` first, so that converted vision
        weights (`python -m medjax.convert mae`: {"vision"} only) start beside CXR-BERT, while an `init` that
        holds a text tower (a pretraining run) keeps its own."""
        return super().load_pretrained(self.initial_params(params), pretrained)

    # ---- loss -----------------------------------------------------------------------------------------
    def loss_fn(self, params, batch, rng, train):
        image, text, temp = self.model.apply({"params": params}, batch["volumes"], batch["masks"], batch["input_ids"],
                                             batch["attention_mask"], train=train, rngs={"dropout": rng})
        per_organ, taken = organ_losses(jnp.swapaxes(image, 0, 1), jnp.swapaxes(text, 0, 1), batch["normal"].T,
                                        batch["text_ids"].T, batch["intact"].T, temp)
        metrics = {"temperature": jnp.asarray(temp, jnp.float32), "organs_taken": taken.sum().astype(jnp.float32),
                   "target_entropy": organ_target_entropy(batch["normal"].T, batch["text_ids"].T, batch["intact"].T, taken)}
        metrics.update({f"{organ}_loss": per_organ[i] for i, organ in enumerate(self.organs)})
        return jnp.sum(per_organ), metrics

    def post_update(self, params, metrics, step):
        """Clamp the temperature to [loss.min_temperature, loss.max_temperature] (the original's `temp.clamp_`)."""
        low, high = float(self.config.loss.min_temperature), float(self.config.loss.max_temperature)
        temp = params["temp"]
        value = temp.unbox() if isinstance(temp, nn.meta.AxisMetadata) else temp
        clamped = jnp.clip(value, low, high)
        return dict(params, temp=temp.replace_boxed(clamped) if isinstance(temp, nn.meta.AxisMetadata) else clamped), metrics

    # ---- data ---------------------------------------------------------------------------------------
    def dataset(self, split: str) -> CTReportDataset:
        d = self.config.data
        dataset = CTReportDataset(self.root, split, organs=self.organs, mask_labels=d.mask_labels)
        self.verify_data(dataset.file_checks())
        return dataset

    def train_data(self):
        d = self.config.data
        transform = FVLMExample(self.tokenizer, self.crop_shape, d.max_length, train=True, flip_p=d.flip_p)
        return global_batch_dataset(self.dataset(d.split), global_batch=self.global_batch, transform=transform,
                                    seed=int(self.config.seed), process_index=jax.process_index(),
                                    process_count=jax.process_count(), prefetch_threads=int(d.prefetch_threads),
                                    on_bad_example=self.on_bad_example)

    # ---- evaluation ---------------------------------------------------------------------------------
    def embedding_functions(self, params):
        """(image_fn(volumes, masks), text_fn(input_ids, attention_mask), temperature) of trained params, jitted."""
        params = params.get("params", params) if isinstance(params, dict) and "params" in params else params
        params = jax.device_put(nn.unbox(params))
        model = self.model
        image_fn = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, method=fvlm_lib.FVLM.image_embeddings))
        text_fn = jax.jit(lambda p, i, a: model.apply({"params": p}, i, a, method=fvlm_lib.FVLM.text_embeddings))
        return (functools.partial(image_fn, params), functools.partial(text_fn, params),
                float(np.asarray(params["temp"])))

    def eval_image_embeddings(self, test: CTReportDataset, image_fn) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (scans, organs, E), intact (scans, organs) bool) of the test split: each scan's centre
        crop (module docstring)."""
        transform = FVLMExample(self.tokenizer, self.crop_shape, self.config.data.max_length, train=False)
        embeds, intact = [], []
        for batch in eval_batches(test, int(self.run.eval_batch_size), transform):
            valid = batch["valid"]
            out = image_fn(jnp.asarray(batch["volumes"]), jnp.asarray(batch["masks"]))
            embeds.append(np.asarray(out)[valid]), intact.append(batch["intact"][valid])
        return np.concatenate(embeds), np.concatenate(intact)

    def evaluate(self, params) -> dict[str, float]:
        d = self.config.data
        test = self.dataset(d.eval_split)
        if not test.label_names:
            raise MedjaxInputError(f"{os.path.join(self.root, d.eval_split + '_labels.csv')}: the zero-shot evaluation needs "
                             "the split's label CSV")
        image_fn, text_fn, temp = self.embedding_functions(params)
        embeds, intact = self.eval_image_embeddings(test, image_fn)
        labels = np.asarray(test.labels, np.float32)
        per_label = {}
        for column, organ, name in self.config.eval.labels:
            if column not in test.label_names or organ not in self.organs:
                raise MedjaxInputError(f"eval.labels: ({column!r}, {organ!r}): column not in {test.label_names} or organ not "
                                 f"in data.organs {self.organs}")
            c, o = test.label_names.index(column), self.organs.index(organ)
            tokens = [tokenize(self.tokenizer, p, int(d.max_length)) for p in (f"Not {name}.", f"{name}.")]
            ids = jnp.asarray(np.stack([t["input_ids"] for t in tokens]))[:, None]
            mask = jnp.asarray(np.stack([t["attention_mask"] for t in tokens]))[:, None]
            prompts = np.asarray(text_fn(ids, mask))[:, 0]  # (2, E): negative, positive
            keep = intact[:, o]
            y = labels[keep, c]
            if not 0 < y.sum() < len(y):
                continue
            logits = embeds[keep, o] @ prompts.T / temp
            logits -= logits.max(1, keepdims=True)
            score = np.exp(logits[:, 1]) / np.exp(logits).sum(1)
            per_label[column] = dict(binary_metrics(y, score), **label_chance(y))
        results = {f"{m}": float(np.mean([r[m] for r in per_label.values()])) if per_label else float("nan")
                   for m in METRICS + tuple(m + CHANCE_SUFFIX for m in CHANCE_METRICS)}
        results["labels_evaluated"] = float(len(per_label))
        for column, r in per_label.items():
            results[f"auc/{column}"] = r["auc"]
        return results

    def results_table(self, exp: str, columns) -> str:
        """The CT-RATE zero-shot table (Precision / ACC / F1 / AUC, %), the papers' rows above ours."""
        lines = ["| Method | Precision | ACC | F1 | AUC |", "|---|---|---|---|---|",
                 "| fVLM (paper) | 37.9 | 71.8 | 75.1 | 77.8 |", "| ViSD-Boost (paper) | 38.7 | 73.1 | 75.9 | 79.0 |"]
        for label, r in columns:  # chance (medjax.metrics.chance, macro over the same labels) beside each number
            lines.append(f"| medjax {exp} {label} | " + " | ".join(
                f"{100 * r[k]:.1f}" + (f" (chance {100 * r[k + CHANCE_SUFFIX]:.1f})" if k + CHANCE_SUFFIX in r else "")
                for k in ("precision", "accuracy", "weighted_f1", "auc")) + " |")
        for label, r in columns:  # each label's AUC beside its chance (0.5), under the macro row
            per_label = [f"{key[len('auc/'):]} {100 * v:.1f} (chance {100 * AUC_CHANCE:.1f})"
                         for key, v in r.items() if key.startswith("auc/")]
            if per_label:
                lines.append(f"\nAUC per label, medjax {exp} {label}: " + ", ".join(per_label))
        return "\n".join(lines)
