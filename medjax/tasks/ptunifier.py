"""PTUnifier pretraining task (Chen et al., ICCV 2023, Sec. 3.4): image-report pairs,

    L = 1.0 L_MLM + 0.5 L_ITM + 0.1 L_ITC      (weights from the released task_pretrain_ptunifier config)

MLM on (image, 15%-masked sentence); ITM on (image or another sample's image, clean sentence); ITC on
the joint features of the image-only path (textual prompts) and the text-only path (visual prompts),
symmetric InfoNCE at temperature 0.1 over the global batch. `reproduce_released_code=True` gives the
released code's behaviour instead: frozen prompt pools and no ITC (its `"cl"`/`"itc"` key mismatch).
Optimiser (the original's `set_schedule`, as `optim` rules in experiments/ptunifier.py): AdamW (0.9, 0.98), eps 1e-8, weight decay 0.01 except biases
and LayerNorm scales; lr x5 for the heads, the fusion module (projections, co-attention, poolers) and the
prompt pools; linear warmup over 10% of the steps, then linear decay to 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medjax.data.readers.image_report import ImageReportDataset, load_tokenizer
from medjax.data.pipelines.image_report import PretrainingTransform, pretraining_train_data
from medjax.data.pipelines.global_batches import eval_batches
from medjax.data.verify import image_report_checks
from medjax.losses.contrastive import contrastive_loss, l2_normalize
from medjax.losses.itm import itm_accuracy, itm_loss, itm_pairs
from medjax.losses.mlm import IGNORE_INDEX, mlm_accuracy, mlm_loss
from medjax.metrics.chance import recall_at_k_chance
from medjax.metrics.retrieval import retrieval_recall
from medjax.models import ptunifier as model_lib
from medjax.params import merge_params
from medjax.tasks.base import TaskBase
from medjax.tasks.common import data_root
from medjax.errors import MedjaxInputError

POOL_PARAMS = r"^(visual_prompts|textual_prompts)(/|$)"  # frozen with reproduce_released_code (optim_config)
BATCH_KEYS = ("image", "text_ids", "text_mask", "text_ids_mlm", "text_labels_mlm")


def _files(root: str, spec: str) -> list[str]:
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise MedjaxInputError("data.train_files: expected one or more comma-separated .jsonl manifests or .arrow files")
    return [n if n.startswith("/") else f"{root}/{n}" for n in names]


class PTUnifierTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        data = config.data
        self.root = data_root(data, log)
        self.tokenizer_dir = data.tokenizer or f"{self.root}/tokenizer"
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.released = bool(config.get("reproduce_released_code", False))
        self.model_cfg = self._model_config(tokenizer)
        self.model = model_lib.ptunifier_from_config(self.model_cfg, dtype=jnp.dtype(config.dtype))
        self.transform = PretrainingTransform(
            self.tokenizer_dir, image_size=self.model_cfg.image_size, max_length=data.max_length,
            resized_crop=data.resized_crop, sent_level=data.sent_level, mlm_probability=data.mlm_probability,
            whole_word_masking=bool(data.get("whole_word_masking", False)),
            eval_seed=int(config.seed))
        self.dataset = ImageReportDataset(_files(self.root, data.train_files), split=data.split or None)
        self.verify_data(image_report_checks(self.dataset))  # data.verify (medjax.data.verify)
        w = config.loss
        self.weights = {"mlm": float(w.mlm), "itm": float(w.itm), "itc": 0.0 if self.released else float(w.itc)}

    def _model_config(self, tokenizer):
        cfg = self.config.model.copy_and_resolve_references()
        with cfg.unlocked():
            if not cfg.vocab_size:
                cfg.vocab_size = len(tokenizer)
            if len(tokenizer) > cfg.vocab_size:
                raise MedjaxInputError(f"{self.tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but "
                                 f"model.vocab_size={cfg.vocab_size}")
            for field, token in (("cls_token_id", "cls_token_id"), ("sep_token_id", "sep_token_id"),
                                 ("pad_token_id", "pad_token_id")):
                value = getattr(tokenizer, token)
                if value is None:
                    raise MedjaxInputError(f"{self.tokenizer_dir}: the tokenizer has no {token.replace('_id', '')}")
                cfg[field] = int(value)
            if self.released:
                cfg.prompts_trainable = False
        longest = int(self.config.data.max_length) + (cfg.pad_token_id + 1 if cfg.roberta_positions else 0)
        if cfg.max_positions < longest:
            raise MedjaxInputError(f"model.max_positions={cfg.max_positions} is too small for data.max_length="
                             f"{self.config.data.max_length} (needs >= {longest})")
        return cfg

    def work_per_example(self) -> tuple[int, str]:
        """Input tokens of one pair (image patches + class token + text), for throughput."""
        m = self.model_cfg
        return (m.image_size // m.patch_size) ** 2 + 1 + int(self.config.data.max_length), "tokens"

    def init_batch(self) -> dict:
        b, s, length = self.global_batch, self.model_cfg.image_size, int(self.config.data.max_length)
        ids = np.zeros((b, length), np.int32)
        return {"image": np.zeros((b, s, s, 3), np.float32), "text_ids": ids, "text_mask": np.ones_like(ids),
                "text_ids_mlm": ids, "text_labels_mlm": np.full_like(ids, IGNORE_INDEX)}

    def init_params(self, rng):
        batch = {k: v[:2] for k, v in self.init_batch().items()}
        params_rng, dropout_rng = jax.random.split(rng)
        variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, batch["image"], batch["text_ids"],
                                    batch["text_mask"])
        return variables["params"]  # the modules outside the towers init as the original's init_weights

    # ---- objectives ----------------------------------------------------------------------------------
    def _outputs(self, params, batch, rng, train):
        """All pretraining logits / features in one apply (MLM, ITM with its pairing, ITC) and the ITM labels."""
        dropout_rng, itm_rng = jax.random.split(rng)
        labels, partner = itm_pairs(itm_rng, batch["image"].shape[0])
        outputs = self.model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_ids_mlm"],
                                   batch["text_mask"], partner, with_itc=self.weights["itc"] > 0.0, train=train,
                                   method=self.model.pretraining_outputs, rngs={"dropout": dropout_rng})
        return outputs, labels

    def loss_fn(self, params, batch, rng, train):
        outputs, itm_labels = self._outputs(params, batch, rng, train)
        parts = {"mlm_loss": mlm_loss(outputs["mlm_logits"], batch["text_labels_mlm"]),
                 "mlm_accuracy": mlm_accuracy(outputs["mlm_logits"], batch["text_labels_mlm"]),
                 "itm_loss": itm_loss(outputs["itm_logits"], itm_labels),
                 "itm_accuracy": itm_accuracy(outputs["itm_logits"], itm_labels)}
        loss = self.weights["mlm"] * parts["mlm_loss"] + self.weights["itm"] * parts["itm_loss"]
        if "itc_image" in outputs:
            parts["itc_loss"] = contrastive_loss(outputs["itc_image"], outputs["itc_text"],
                                                 float(self.config.loss.itc_temperature))
            loss = loss + self.weights["itc"] * parts["itc_loss"]
        return loss, parts

    # ---- optimisation --------------------------------------------------------------------------------
    def optim_config(self):
        """`optim` plus, with reproduce_released_code, the prompt pools frozen (one flag switches the loss
        and the optimizer, so the rule is added here rather than in the config)."""
        optim = self.config.optim
        if not self.released:
            return optim
        optim = optim.copy_and_resolve_references()
        with optim.unlocked():
            optim.frozen = list(optim.frozen) + [POOL_PARAMS]
        return optim

    # ---- data ----------------------------------------------------------------------------------------
    def train_data(self):
        return pretraining_train_data(self.dataset, self.transform, global_batch=self.global_batch,
                                      seed=int(self.config.seed), process_index=jax.process_index(),
                                      process_count=jax.process_count(), on_bad_example=self.on_bad_example)

    @functools.cached_property
    def eval_dataset(self) -> ImageReportDataset:
        data = self.config.data
        dataset = ImageReportDataset(_files(self.root, data.eval_files or data.train_files), split=data.eval_split or None)
        self.verify_data(image_report_checks(dataset))
        return dataset

    @functools.cached_property
    def _eval_step(self):
        def step(params, batch, rng):
            outputs, labels = self._outputs(params, batch, rng, False)
            logits, mlm_labels = outputs["mlm_logits"], batch["text_labels_mlm"]
            valid = mlm_labels != IGNORE_INDEX
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            picked = jnp.take_along_axis(log_probs, jnp.where(valid, mlm_labels, 0)[..., None], -1)[..., 0]
            itm_log_probs = jax.nn.log_softmax(outputs["itm_logits"].astype(jnp.float32), -1)
            out = {"mlm_nll": -jnp.sum(jnp.where(valid, picked, 0.0), 1), "mlm_count": valid.sum(1),
                   "mlm_hits": ((jnp.argmax(logits, -1) == mlm_labels) & valid).sum(1),
                   "itm_nll": -jnp.take_along_axis(itm_log_probs, labels[:, None], -1)[:, 0],
                   "itm_hits": jnp.argmax(outputs["itm_logits"], -1) == labels}
            if "itc_image" in outputs:
                out["itc_image"] = l2_normalize(outputs["itc_image"])
                out["itc_text"] = l2_normalize(outputs["itc_text"])
            return out

        return jax.jit(step)

    def evaluate(self, params) -> dict[str, float]:
        """Held-out MLM loss/accuracy, ITM loss/accuracy and, with ITC, the ITC loss over the whole split and
        zero-shot image<->text retrieval R@1/5/10 with the ITC features (one entry per unique image)."""
        dataset = self.eval_dataset
        size = self.run.eval_batch_size
        transform = lambda ex: dict(self.transform(ex), image_index=ex["image_index"])  # noqa: E731
        sums, images, texts, text_image = {}, {}, [], []
        for index, batch in enumerate(eval_batches(dataset, size, transform)):
            valid, image_index = batch.pop("valid"), batch.pop("image_index")
            out = jax.device_get(self._eval_step(params, batch, jax.random.fold_in(jax.random.PRNGKey(0), index)))
            for key in ("mlm_nll", "mlm_count", "mlm_hits", "itm_nll", "itm_hits"):
                sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(out[key], np.float64)[valid]))
            if "itc_image" in out:
                for row in np.flatnonzero(valid):
                    images.setdefault(int(image_index[row]), out["itc_image"][row])
                    texts.append(out["itc_text"][row])
                    text_image.append(int(image_index[row]))
        count = len(dataset)
        results = {"mlm_loss": sums["mlm_nll"] / max(sums["mlm_count"], 1.0),
                   "mlm_accuracy": sums["mlm_hits"] / max(sums["mlm_count"], 1.0),
                   "itm_loss": sums["itm_nll"] / count, "itm_accuracy": sums["itm_hits"] / count,
                   # input-blind values (medjax.metrics.chance): half the ITM pairs match
                   "itm_loss_chance": float(np.log(2.0)), "itm_accuracy_chance": 0.5}
        if texts:
            order = sorted(images)
            position = {image: i for i, image in enumerate(order)}
            scores = np.stack([images[i] for i in order]) @ np.stack(texts).T
            results.update(retrieval_recall(scores, np.asarray([position[i] for i in text_image])))
            for k in (1, 5, 10):  # a random ranking: text->image among the images, image->text among the texts
                results[f"ir_r{k}_chance"] = 100.0 * recall_at_k_chance(k, len(order))
                results[f"tr_r{k}_chance"] = 100.0 * recall_at_k_chance(k, len(texts))
            if len(order) == len(texts):  # one text per image: the ITC loss over the whole split
                results["itc_loss"] = float(contrastive_loss(np.stack([images[i] for i in text_image]),
                                                             np.stack(texts), float(self.config.loss.itc_temperature)))
                results["itc_loss_chance"] = float(np.log(len(texts)))  # uniform similarities
        return results

    # ---- weights -------------------------------------------------------------------------------------
    def initial_params(self, params):
        """Scratch-initialised (unboxed, host) params with the towers from local Hugging Face directories
        (`model.init_vision`: CLIP vision, `model.init_text`: RoBERTa/BERT), via medjax.convert.hf.load."""
        vision, text = self.config.model.get("init_vision", ""), self.config.model.get("init_text", "")
        if not (vision or text):
            return params
        from medjax.convert.ptunifier import init_towers_from_hf

        params, _ = init_towers_from_hf(params, vision=vision, text=text)
        return params

    def load_pretrained(self, params, pretrained):
        """Another PTUnifier run's (or a converted checkpoint's) params: every leaf of the same path and shape;
        a vision position table of another grid is resized bicubically first. The rest keeps its
        initialisation, logged by path: e.g. from METER (`python -m medjax.convert meter`) the ITC head and
        the prompt pools, which METER does not have."""
        pretrained = _resize_vision_positions(pretrained, params)
        merged, skipped = merge_params(params, pretrained)
        if skipped:
            self.log(f"init: {len(skipped)} params keep their initialisation: {', '.join(skipped)}")
        return merged


def _resize_vision_positions(pretrained, params):
    from medjax.nn.clip_vit import resize_position_embedding

    try:
        source, target = pretrained["vision"]["position_embedding"], params["vision"]["position_embedding"]
    except (KeyError, TypeError):
        return pretrained
    if np.shape(source) == np.shape(target):
        return pretrained
    grid = round((np.shape(target)[0] - 1) ** 0.5)
    vision = dict(pretrained["vision"], position_embedding=np.asarray(resize_position_embedding(
        jnp.asarray(source, jnp.float32), (grid, grid))))
    return dict(pretrained, vision=vision)
