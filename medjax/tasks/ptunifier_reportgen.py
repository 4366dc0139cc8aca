"""PTUnifier MIMIC-CXR report generation and summarisation (Chen et al., ICCV 2023, Sec. 4, generation
table; the original's `compute_clm` and the `task_finetune_clm_mimic_cxr_*` configs): a decoder on the
fused features (medjax/models/ptunifier_reportgen.py), teacher-forced token cross-entropy in training,
beam search (beam 5, medjax/inference/beam_search.py) under one jit at static shapes in evaluation,
BLEU-1..4 and ROUGE-L by pycocoevalcap after PTB tokenisation (medjax/metrics/captioning.py).

`finetune.mode`: "vision" (image -> findings: report generation), "language" (findings -> impression:
summarisation), "vision_language" (image + findings -> impression). Targets are lower-cased (as the
original) and tokenised to `finetune.max_target_len` (the original's clm_max_text_len, also the generation
max_length, the start token included). An empty generation is replaced by the original's fallback text
before scoring. With `finetune.init_decoder_from_text` a pretraining checkpoint's text-encoder embeddings
and layers (self-attention, FFN) and its MLM head initialise the decoder (its cross-attention is new), as
the original copies `language_encoder` and `mlm_head` into `clm_head`.
"""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxInputError
from medjax.inference.beam_search import beam_search
from medjax.metrics.captioning import caption_scores
from medjax.models.ptunifier_reportgen import MODES, reportgen_model_from_config
from medjax.nn.transformer import unstack_layers
from medjax.tasks import ptunifier_finetune_data as finetune_data
from medjax.tasks.ptunifier_finetune import PTUnifierFinetuneTask

EMPTY_REPORT = "there is no evidence of pulmonary."  # the original's stand-in for an empty generation


class PTUnifierReportGenTask(PTUnifierFinetuneTask):
    TABLE = (("BLEU-1", "bleu_1"), ("BLEU-2", "bleu_2"), ("BLEU-3", "bleu_3"), ("BLEU-4", "bleu_4"),
             ("ROUGE-L", "rouge_l"))
    TABLE_SCALE = 100.0  # pycocoevalcap gives fractions
    NEW_PARAMS = ("task_head", "report_decoder", "clm_proj", "clm_norm")

    @property
    def mode(self) -> str:
        mode = str(self.config.finetune.mode)
        if mode not in MODES:
            raise MedjaxInputError(f"finetune.mode={mode!r}; expected one of {MODES}")
        return mode

    @property
    def target_field(self) -> str:
        return "findings" if self.mode == "vision" else "impression"  # the original: findings iff vision_only

    def build_model(self, dtype):
        layers = int(self.config.finetune.decoder_layers) or int(self.model_cfg.text_depth)
        return reportgen_model_from_config(self.model_cfg, self.mode, layers, dtype)

    def dataset(self, split: str) -> finetune_data.ReportDataset:
        return finetune_data.ReportDataset(self.path(split), finetune_data.row_split(split))

    def num_outputs(self) -> int:
        return 0

    @property
    def max_target_len(self) -> int:
        return int(self.config.finetune.max_target_len)

    @functools.cached_property
    def target_tokenizer(self):
        """A copy of the tokenizer for the targets: a fast tokenizer holds its truncation length as state, and
        the loader threads tokenise inputs (data.max_text_len) and targets (max_target_len) concurrently."""
        return copy.deepcopy(self.tokenizer)

    def target(self, text: str) -> dict:
        from medjax.data.readers.image_report import tokenize

        enc = tokenize(self.target_tokenizer, text.lower(), self.max_target_len)
        return {"target_ids": enc["input_ids"], "target_mask": enc["attention_mask"]}

    def example(self, ex: dict, rng=None) -> dict:
        out = dict(self.text(ex["findings"]), image=self.image(ex["image"], rng), **self.target(ex[self.target_field]))
        return out

    def init_batch(self) -> dict:
        b, t = self.global_batch, self.max_target_len
        return dict(self.text_batch(), image=self.image_batch(), target_ids=np.zeros((b, t), np.int32),
                    target_mask=np.ones((b, t), np.int32))

    def loss_fn(self, params, batch, rng, train):
        logits = self.apply(params, self.model.report_logits, batch["image"], batch["text_ids"], batch["text_mask"],
                            batch["target_ids"], batch["target_mask"], rng=rng, train=train).astype(jnp.float32)
        labels = batch["target_ids"][:, 1:]
        keep = (labels != self.model_cfg.pad_token_id).astype(jnp.float32)  # the original's ignore_index=pad
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        loss = (nll * keep).sum() / jnp.maximum(keep.sum(), 1.0)
        hit = (jnp.argmax(logits[:, :-1], -1) == labels).astype(jnp.float32)
        return loss, {"clm_loss": loss, "train_token_accuracy": (hit * keep).sum() / jnp.maximum(keep.sum(), 1.0)}

    # ---- generation ----------------------------------------------------------------------------
    @functools.cached_property
    def _generate(self):
        """(params, images, ids, mask, rng) -> (batch, max_target_len) token ids of the best beam (`generate_tokens`
        with this task's model and decoding settings)."""
        f, cfg = self.config.finetune, self.model_cfg
        return functools.partial(generate_tokens, model=self.model, beams=int(f.num_beams), length=self.max_target_len,
                                 start_id=int(cfg.cls_token_id), eos_id=int(cfg.sep_token_id),
                                 pad_id=int(cfg.pad_token_id), length_penalty=float(f.length_penalty),
                                 sample=bool(f.beam_sample), top_k=int(f.top_k))

    def generate(self, params, dataset) -> list[str]:
        """The generated report of every sample of `dataset`, in order (empty ones replaced as the original)."""
        from medjax.data.pipelines.global_batches import eval_batches

        generated, rng = [], jax.random.PRNGKey(int(self.config.seed))
        for k, batch in enumerate(eval_batches(dataset, self.run.eval_batch_size, self.example)):
            tokens = np.asarray(self._generate(params, batch["image"], batch["text_ids"], batch["text_mask"],
                                               jax.random.fold_in(rng, k)))[batch["valid"]]
            texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
            generated += [t.strip() or EMPTY_REPORT for t in texts]
        return generated

    def selection_metric(self):
        """The original's `the_metric`: BLEU-1 + ... + BLEU-4 for report generation; for summarisation it sums
        torchmetrics' ROUGE-1/2/L F, of which medjax computes ROUGE-L (the pycocoevalcap one)."""
        return ("bleu_sum", "max") if self.mode == "vision" else ("rouge_l", "max")

    def scores(self, params, dataset) -> dict[str, float]:
        generated = self.generate(params, dataset)
        references = [t.lower() for t in dataset.texts(self.target_field)]  # whole, as the original's gt_texts
        scores = caption_scores(references, generated, tokenizer=str(self.config.finetune.eval_tokenizer))
        return dict(scores, bleu_sum=sum(scores[f"bleu_{n}"] for n in range(1, 5)), examples=float(len(generated)))

    # ---- initialisation ------------------------------------------------------------------------
    def load_pretrained(self, params, pretrained):
        """The backbone from `pretrained`; the decoder too when it holds one, else (with
        `finetune.init_decoder_from_text`) initialised from its text encoder and MLM head."""
        merged = super().load_pretrained(params, pretrained)
        if "report_decoder" in pretrained or not bool(self.config.finetune.init_decoder_from_text):
            return merged
        return decoder_from_text(merged)


@functools.partial(jax.jit, static_argnames=("model", "beams", "length", "start_id", "eos_id", "pad_id",
                                             "length_penalty", "sample", "top_k"))
def generate_tokens(params, images, ids, mask, rng, *, model, beams: int, length: int, start_id: int, eos_id: int,
                    pad_id: int, length_penalty: float, sample: bool, top_k: int) -> jax.Array:
    """Beam search (medjax.inference.beam_search) from the report model's encoder states: (batch, `length`) token ids.
    One module-level jit keyed by the (hashable) model and the settings, so a task built again for the same
    model (the trainer's validation, then `medjax.evaluate`) reuses the compiled search."""
    apply = functools.partial(model.apply, {"params": params})
    states = apply(images, ids, mask, method=model.encoder_states)
    states = jnp.repeat(states, beams, axis=0)  # the original's expanded_idx
    logits_fn = lambda tokens, t: apply(states, tokens, t, method=model.next_token_logits)  # noqa: E731
    start = jnp.full((ids.shape[0],), start_id, jnp.int32)
    sequences, _ = beam_search(logits_fn, start, beam_size=beams, max_length=length, eos_id=eos_id, pad_id=pad_id,
                               length_penalty=length_penalty, sample=sample, top_k=top_k, rng=rng)
    return sequences


def decoder_from_text(params: dict) -> dict:
    """`params` with report_decoder's embeddings, self-attention / FFN of its first layers and lm head copied
    from the text encoder (`text`) and the MLM head (the original's `clm_head` initialisation; the decoder's
    cross-attention keeps its own init)."""
    copy_of = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731  (own buffers:
    # the train state is donated, and one buffer twice in a donated tree is an error)
    text = unstack_layers(params["text"])
    decoder = dict(params["report_decoder"])
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "embedding_norm"):
        decoder[name] = copy_of(text[name])
    for i in range(sum(k.startswith("layers_") for k in decoder)):
        source, layer = text.get(f"layers_{i}"), dict(decoder[f"layers_{i}"])
        if source is None:
            break
        layer.update(copy_of(dict(self_attention=source["attention"], self_attention_norm=source["attention_norm"],
                                  fc1=source["fc1"], fc2=source["fc2"], output_norm=source["output_norm"])))
        decoder[f"layers_{i}"] = layer
    decoder.update(copy_of(dict(lm_transform=params["mlm_transform"], lm_norm=params["mlm_norm"],
                                lm_decoder=params["mlm_decoder"], lm_bias=params["mlm_bias"])))
    return dict(params, report_decoder=decoder)
