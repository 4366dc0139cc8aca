"""PathChat / LLaVA-1.5 visual instruction tuning (Lu et al., Nature 2024; Liu et al., CVPR 2024): a
`medjax.models.llava.Llava` (vision tower, projector, Llama) trained on LLaVA-format conversations.

- Stage 1 (experiment `pathchat_stage1`, template "plain"): image-caption alignment, only the projector
  trained (`optim.frozen` = the vision tower and the LLM; optax `multi_transform` through medjax.optim).
- Stage 2 (`pathchat_stage2`, template "vicuna_v1" or "llama_2"): instruction tuning, LLM + projector.
Loss: next-token cross-entropy in float32 over the supervised (assistant) tokens only, labels shifted
inside the loss (HF's `ForCausalLMLoss`), averaged over the batch's supervised tokens.

Weights: `model.init_llava` (a Hugging Face `llava` directory: the whole model), or `model.init_vision` (a
CLIP vision directory, e.g. clip-vit-large-patch14-336) and `model.init_llm` (a `llama` directory, e.g.
Vicuna / Llama 2) for the LLaVA recipe; otherwise the towers are built from the `model` block.

Evaluation (PathQABench's layout, `data.mcq_file` / `data.open_file`): multiple choice, image only and with
the clinical context, as the option whose "{letter}. {choice}" reply has the highest log-likelihood (our
choice: scoring instead of parsing a free answer); open-ended answers generated greedily and written, with
the references, to `pathqabench_open_answers.jsonl` beside evaluate's results (else in the workdir, else beside
data.open_file) for judging; the eval loss on
`data.eval_file`.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medjax.config import ConfigError
from medjax.data import demo as demo_lib
from medjax.data.errors import DataError
from medjax.data.pipelines.global_batches import eval_batches, global_batch_dataset
from medjax.data.pipelines.length_buckets import bucket_lengths, length_bucketed_dataset
from medjax.data.readers.image_io import read_image
from medjax.data.readers.image_report import load_tokenizer, read_jsonl
from medjax.data.verify import FileCheck
from medjax.metrics.chance import CHANCE_SUFFIX, multiple_choice_chance
from medjax.models.llava import Llava
from medjax.models.uni_vision_tower import (IMAGENET_MEAN, IMAGENET_STD, tower_from_uni, tower_variables,
                                            uni_vision_tower)
from medjax.nn.clip_vit import CLIPVisionTransformer
from medjax.nn.llama import Llama
from medjax.optim import frozen_labels, frozen_matcher
from medjax.params import merge_params
from medjax.tasks.base import TaskBase, markdown_table
from medjax.tasks.pathchat_data import (CLIP_MEAN, CLIP_STD, IGNORE, IMAGE_TOKEN, ConversationDataset,
                                        ConversationExample, encode, image_pixels, pad_or_truncate, render)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed token NLL per row, supervised tokens per row, correct argmax tokens per row): logits[:, t]
    predicts labels[:, t + 1]; -100 is ignored; float32."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets) & valid
    return jnp.sum(nll * valid, axis=1), jnp.sum(valid, axis=1), jnp.sum(correct, axis=1)


class PathChatTask(TaskBase):
    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        d, m = config.data, config.model
        self.root = d.dir or demo_lib.ensure_demo("pathology_chat", log=log)
        self.tokenizer = load_tokenizer(d.tokenizer or os.path.join(self.root, "tokenizer"))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise DataError(f"tokenizer {d.tokenizer or os.path.join(self.root, 'tokenizer')}: has no {IMAGE_TOKEN} "
                            "token; add it as a special token (tokenizer.add_special_tokens)")
        dtype = jnp.dtype(config.dtype)
        self._llava_variables = self._vision_variables = self._llm_variables = None
        if m.init_llava and m.vision_tower != "clip":
            raise ConfigError(f"config model.init_llava={m.init_llava!r} loads a Hugging Face LLaVA with its CLIP tower; "
                              f"model.vision_tower={m.vision_tower!r} needs model.init_vision + model.init_llm instead")
        stored = {part: self._stored_dtype(part) for part in ("vision_tower", "language_model")}
        if m.init_llava:
            from medjax.convert import hf

            self.model, self._llava_variables = hf.load(m.init_llava, scan=m.scan, dtype=dtype)
            self.model = self.model.clone(projector=m.projector, num_queries=m.num_queries,
                                          freeze_vision=bool(m.freeze_vision))
        else:
            vision = self._vision_tower(m, dtype)
            language = Llama(vocab_size=int(m.vocab_size) or len(self.tokenizer), width=m.width, depth=m.depth,
                             num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or None, mlp_dim=m.mlp_dim,
                             rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, scan=m.scan, remat=m.remat,
                             dtype=dtype)
            if m.init_vision and m.vision_tower == "uni":
                from medjax.convert import uni

                # the architecture is read off the checkpoint, except the head count (not in any shape):
                # model.vision_heads (16 for UNI ViT-L/16, 24 for UNI2-h)
                encoder, variables = uni.load(m.init_vision, dtype=dtype, param_dtype=stored["vision_tower"],
                                              num_heads=int(m.vision_heads))
                vision = tower_from_uni(encoder, int(m.vision_feature_depth))
                self._vision_variables = tower_variables(variables, int(m.vision_feature_depth))
            elif m.init_vision:
                from medjax.convert import hf

                tower, self._vision_variables = hf.load(m.init_vision, dtype=dtype, param_dtype=stored["vision_tower"])
                vision = tower.clone(depth=m.vision_feature_depth, projection_dim=None)
            if m.init_llm:
                from medjax.convert import hf

                language, self._llm_variables = hf.load(m.init_llm, scan=m.scan, dtype=dtype,
                                                        param_dtype=stored["language_model"])
                language = language.clone(remat=m.remat)
            self.model = Llava(vision_tower=vision, language_model=language, image_token_id=self.image_token_id,
                               projector=m.projector, num_queries=m.num_queries,
                               freeze_vision=bool(m.freeze_vision), dtype=dtype)
        self.model = self.model.clone(  # frozen towers stored in model.frozen_param_dtype (no fp32 master needed)
            vision_tower=self.model.vision_tower.clone(param_dtype=stored["vision_tower"]),
            language_model=self.model.language_model.clone(param_dtype=stored["language_model"],
                                                           frozen_layers=self._frozen("language_model")))
        if len(self.tokenizer) > self.model.language_model.vocab_size:
            raise DataError(f"the tokenizer has {len(self.tokenizer)} tokens, more than the LLM's vocab_size="
                            f"{self.model.language_model.vocab_size}")
        self.image_size = self.model.vision_tower.image_size
        self.max_length = int(d.max_length)
        self.buckets = bucket_lengths(list(d.length_buckets), self.max_length) if list(d.length_buckets) else ()
        if int(d.length_group_batches) < 1:
            raise ConfigError(f"config data.length_group_batches={d.length_group_batches}: expected an integer >= 1")
        self.pixel_stats = (IMAGENET_MEAN, IMAGENET_STD) if m.vision_tower == "uni" else (CLIP_MEAN, CLIP_STD)
        self.example = ConversationExample(self.tokenizer, d.template, self.image_size, self.max_length,
                                           self.image_token_id, self.model.num_image_tokens, *self.pixel_stats)

    def _frozen(self, part: str) -> bool:
        """Whether an `optim.frozen` pattern matches the model part's prefix `part/` (no gradient reaches it)."""
        return bool(frozen_matcher(self.optim_config())(part + "/"))

    def _stored_dtype(self, part: str):
        """The dtype `part`'s params are created (and loaded) in: `model.frozen_param_dtype` when an `optim.frozen`
        pattern matches the part's prefix `part/` (stage 1's frozen 7B / 13B Llama in bf16, no fp32 copy: only
        trained params need a float32 master for Adam), else float32."""
        name = str(self.config.model.get("frozen_param_dtype", "") or "")
        return jnp.dtype(name) if name and self._frozen(part) else jnp.dtype(jnp.float32)

    @staticmethod
    def _vision_tower(m, dtype) -> nn.Module:
        """model.vision_tower: "clip" (CLIP ViT, LLaVA-1.5) or "uni" (UNI's ViT, PathChat), built from the model
        block up to its feature layer (`model.vision_feature_depth` blocks)."""
        if m.vision_tower == "clip":
            return CLIPVisionTransformer(image_size=m.image_size, patch_size=m.patch_size, width=m.vision_width,
                                         depth=m.vision_feature_depth, num_heads=m.vision_heads,
                                         mlp_dim=m.vision_mlp_dim, dtype=dtype)
        if m.vision_tower == "uni":
            return uni_vision_tower(int(m.vision_feature_depth), image_size=m.image_size, patch_size=m.patch_size,
                                    width=m.vision_width, depth=int(m.vision_feature_depth), num_heads=m.vision_heads,
                                    mlp_ratio=m.vision_mlp_dim / m.vision_width, mlp_dim=m.vision_mlp_dim,
                                    dtype=dtype)
        raise ConfigError(f"config model.vision_tower={m.vision_tower!r}: expected 'clip' (CLIP ViT-L/14, LLaVA-1.5) "
                          "or 'uni' (UNI ViT-L/16, PathChat)")

    # ---- shapes / params -----------------------------------------------------------------------------
    def work_per_example(self) -> tuple[int, str]:
        """data.max_length tokens: every row's length without length buckets (with them, an upper bound)."""
        return self.max_length, "tokens"

    def work_in_batch(self, batch: dict) -> int:
        """The batch's real tokens (image, prompt and reply; attention_mask 1), not its padding to the bucket or
        max_length: what the bench's tokens/s counts."""
        return int(np.sum(batch["attention_mask"]))

    def init_batch(self) -> dict:
        b, t, s = self.global_batch, self.max_length, self.image_size
        ids = np.zeros((b, t), np.int32)
        ids[:, 1:1 + self.model.num_image_tokens] = self.image_token_id
        return {"pixel_values": np.zeros((b, s, s, 3), np.float32), "input_ids": ids,
                "labels": np.full((b, t), IGNORE, np.int32), "attention_mask": np.ones((b, t), np.int32)}

    def init_params(self, rng):
        """No param depends on the text length (RoPE, no learned positions): initialised on the shortest
        sequence holding the image (BOS, image tokens, one token), so runs of any data.max_length (stage 1's
        captions, stage 2's conversations) trace one init program."""
        n, s = self.model.num_image_tokens, self.image_size
        ids = np.zeros((1, n + 2), np.int32)
        ids[:, 1:1 + n] = self.image_token_id
        return self.model.init(rng, ids, pixel_values=np.zeros((1, s, s, 3), np.float32))["params"]

    def initial_params(self, params):
        """Converted Hugging Face weights where `model.init_llava` / `init_vision` / `init_llm` name them."""
        if self._llava_variables is not None:
            merged, skipped = merge_params(params, self._llava_variables["params"])
            self.log(f"LLaVA weights from {self.config.model.init_llava}; not taken: {skipped or 'none'}")
            return merged
        if self._vision_variables is None and self._llm_variables is None:
            return params
        out = dict(params)
        for name, variables, source in (("vision_tower", self._vision_variables, "init_vision"),
                                        ("language_model", self._llm_variables, "init_llm")):
            if variables is not None:
                out[name], skipped = merge_params(params[name], variables["params"])
                self.log(f"{name} from {self.config.model[source]}; not taken: {skipped or 'none'}")
        return out

    # ---- loss ------------------------------------------------------------------------------------------
    def loss_fn(self, params, batch, rng, train):
        # no gradient is taken for the frozen params (optim.frozen): stage 1 back-propagates through the frozen
        # LLM to the projector without its weight gradients (a 7B-param tree the optimizer would discard)
        frozen = frozen_labels(self.optim_config(), params)
        params = jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p, params, frozen)
        logits = self.model.apply({"params": params}, batch["input_ids"], pixel_values=batch["pixel_values"],
                                  attention_mask=batch["attention_mask"])
        nll, count, correct = causal_lm_loss(logits, batch["labels"])
        tokens = jnp.maximum(jnp.sum(count), 1)
        return jnp.sum(nll) / tokens, {"token_accuracy": jnp.sum(correct) / tokens,
                                       "supervised_tokens": jnp.sum(count).astype(jnp.float32)}

    # ---- data ------------------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.root, name)

    def conversations(self, name: str) -> ConversationDataset:
        dataset = ConversationDataset(self._file(name))
        self.verify_data([FileCheck("image", (item["image"],), f"{item['where']}: field 'image'")
                          for item in dataset.items])
        return dataset

    def train_data(self):
        d = self.config.data
        if self.buckets:
            return length_bucketed_dataset(
                self.conversations(d.train_file), global_batch=self.global_batch, seed=int(self.config.seed),
                transform=self.example, length_of=self.example.length,
                buckets=self.buckets,
                window_batches=int(d.length_group_batches), process_index=jax.process_index(),
                process_count=jax.process_count(), prefetch_threads=int(d.prefetch_threads),
                on_bad_example=self.on_bad_example)
        return global_batch_dataset(self.conversations(d.train_file), global_batch=self.global_batch,
                                    seed=int(self.config.seed), transform=self.example,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    prefetch_threads=int(d.prefetch_threads), on_bad_example=self.on_bad_example)

    # ---- evaluation -------------------------------------------------------------------------------------
    def _chat_template(self) -> str:
        """The template questions are asked in: the run's, or vicuna_v1 after stage 1's "plain" (which has none)."""
        return self.example.template if self.example.template != "plain" else "vicuna_v1"

    def pixels(self, image_path: str) -> np.ndarray:
        """The model's image input (size, size, 3) float32 of an image file (LLaVA-1.5's preprocessing, the
        vision tower's normalisation)."""
        return image_pixels(Image.fromarray(read_image(image_path)), self.image_size, *self.pixel_stats)

    def prompt_ids(self, question: str, where: str) -> np.ndarray:
        """int32 ids of a first human turn `<image>\\n{question}` in the chat template, up to where the assistant's
        reply starts (what generation continues); refused naming `where` when longer than data.max_length."""
        pieces = render([("human", IMAGE_TOKEN + "\n" + question), ("gpt", "x")], self._chat_template(), where)
        prompt = pieces[:[i for i, (_, supervised) in enumerate(pieces) if supervised][0]]
        ids, _ = encode(prompt, self.tokenizer, self.image_token_id, self.model.num_image_tokens)
        if len(ids) > self.max_length:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than data.max_length={self.max_length}")
        return ids

    def _row(self, image_path: str, question: str, answer: str, where: str) -> dict:
        turns = [("human", IMAGE_TOKEN + "\n" + question), ("gpt", answer)]
        ids, labels = encode(render(turns, self._chat_template(), where), self.tokenizer, self.image_token_id,
                             self.model.num_image_tokens)
        row = pad_or_truncate(ids, labels, self.max_length, self.example.pad_id, self.image_token_id, where)
        return dict(row, pixel_values=self.pixels(image_path))

    @functools.cached_property
    def _score(self):
        """jit (params, batch) -> causal_lm_loss's (NLL, supervised tokens, correct tokens) per row; one compiled
        program per task, so repeated validations do not recompile."""
        model = self.model
        return jax.jit(lambda p, b: causal_lm_loss(model.apply({"params": p}, b["input_ids"],
                                                               pixel_values=b["pixel_values"],
                                                               attention_mask=b["attention_mask"]), b["labels"]))

    @functools.cached_property
    def _validation_set(self) -> ConversationDataset:
        return self.conversations(self.config.data.eval_file)

    def _teacher_forced(self, params, dataset) -> tuple[float, float]:
        """(NLL per supervised token, argmax accuracy of the supervised tokens) of the conversations' assistant
        replies, teacher-forced (the training loss on held-out conversations; no generation)."""
        total = count = correct = 0.0
        for batch in eval_batches(dataset, int(self.run.eval_batch_size), self.example):
            nll, n, right = self._score(params, {k: v for k, v in batch.items() if k != "valid"})
            valid = batch["valid"]
            total += float(np.sum(np.asarray(nll)[valid]))
            count += float(np.sum(np.asarray(n)[valid]))
            correct += float(np.sum(np.asarray(right)[valid]))
        return total / max(count, 1.0), correct / max(count, 1.0)

    def validate(self, params) -> dict[str, float]:
        """What `train.eval_every` logs and the best-validation checkpoint selects by: the teacher-forced answer
        loss and token accuracy on `data.eval_file` (the validation conversations, e.g. instruct_val.json).
        Cheap -- one forward pass per batch, no generation -- and never PathQABench (`evaluate`'s test sets)."""
        if not self.config.data.eval_file:
            raise ConfigError("config data.eval_file is empty: train.eval_every needs a validation conversation file "
                              "(LLaVA format, e.g. instruct_val.json); stage 1 has none by default")
        loss, accuracy = self._teacher_forced(jax.device_put(nn.unbox(params)), self._validation_set)
        return {"loss": loss, "token_accuracy": accuracy}

    def selection_metric(self):
        """The lowest validation answer loss (LLaVA reports none; our choice), where there is a validation file."""
        return ("loss", "min") if self.config.data.eval_file else None

    def evaluate(self, params) -> dict[str, float]:
        d = self.config.data
        params = jax.device_put(nn.unbox(params))
        score, size = self._score, int(self.run.eval_batch_size)
        results: dict[str, float] = {}
        if d.eval_file:
            results["eval_loss"] = self._teacher_forced(params, self.conversations(d.eval_file))[0]
        if d.mcq_file:
            results |= self._multiple_choice(params, score, size)
        if d.open_file:
            results["open_answers"] = float(self._open_ended(params))
        return results

    def _multiple_choice(self, params, score, size) -> dict[str, float]:
        path = self._file(self.config.data.mcq_file)
        rows = read_jsonl(path, required=("image", "question", "choices", "answer"))
        out = {}
        for setting in ("image_only", "with_context"):
            candidates, truth = [], []
            for line, row in rows:
                letters = "ABCDEFGH"[:len(row["choices"])]
                if row["answer"] not in letters:
                    raise DataError(f"{path}: line {line}: field 'answer' is {row['answer']!r}; expected one of "
                                    f"{list(letters)}")
                context = (row.get("context", "") + " ") if setting == "with_context" else ""
                options = " ".join(f"{a}. {c}" for a, c in zip(letters, row["choices"]))
                question = f"{context}{row['question']} Options: {options} Answer with the option's letter."
                image = os.path.join(self.root, row["image"])  # image paths are relative to data.dir
                for a, c in zip(letters, row["choices"]):
                    candidates.append(self._row(image, question, f"{a}. {c}", f"{path}: line {line}"))
                truth.append(letters.index(row["answer"]))
            nll = []
            for start in range(0, len(candidates), size):
                chunk = candidates[start:start + size]
                chunk += [chunk[-1]] * (size - len(chunk))
                batch = {k: np.stack([c[k] for c in chunk]) for k in chunk[0]}
                nll.append(np.asarray(score(params, batch)[0]))
            nll = np.concatenate(nll)[:len(candidates)]
            picks, offset = [], 0
            for (_, row) in rows:
                k = len(row["choices"])
                picks.append(int(np.argmin(nll[offset:offset + k])))
                offset += k
            out[f"mcq_{setting}_accuracy"] = float(np.mean(np.asarray(picks) == np.asarray(truth)))
            out[f"mcq_{setting}_accuracy{CHANCE_SUFFIX}"] = multiple_choice_chance([len(r["choices"]) for _, r in rows])
        return out

    def results_table(self, exp: str, columns) -> str:
        """PathQABench's accuracies in percent, each with its chance level (a random pick) beside it."""
        return markdown_table(exp, columns, percent=tuple(f"mcq_{s}_accuracy" for s in ("image_only", "with_context")))

    def _open_ended(self, params) -> int:
        from medjax.generate import generate

        path = self._file(self.config.data.open_file)
        rows = read_jsonl(path, required=("image", "question"))
        out_dir = self.run.results_dir or self.run.workdir or os.path.dirname(path)
        prompts, pixels = [], []
        for line, row in rows:
            prompts.append(self.prompt_ids(row["question"], f"{path}: line {line}: field 'question'"))
            pixels.append(self.pixels(os.path.join(self.root, row["image"])))
        size, texts = int(self.run.eval_batch_size), []
        for start in range(0, len(prompts), size):  # left-padded to max_length: one compiled program
            chunk = list(range(start, min(start + size, len(prompts))))
            chunk += [chunk[-1]] * (size - len(chunk))
            ids = np.full((size, self.max_length), self.example.pad_id, np.int32)
            mask = np.zeros((size, self.max_length), np.int32)
            for r, k in enumerate(chunk):
                ids[r, self.max_length - len(prompts[k]):] = prompts[k]
                mask[r, self.max_length - len(prompts[k]):] = 1
            tokens = np.asarray(generate(self.model, {"params": params}, ids, attention_mask=mask,
                                         pixel_values=np.stack([pixels[k] for k in chunk]),
                                         max_new_tokens=int(self.config.eval.max_new_tokens),
                                         eos_token_id=self.tokenizer.eos_token_id))
            texts += [self.tokenizer.decode(tokens[r, self.max_length:], skip_special_tokens=True).strip()
                      for r in range(min(size, len(prompts) - start))]
        answers = [{"id": row.get("id", line), "question": row["question"], "answer": text,
                    "reference": row.get("reference", "")} for (line, row), text in zip(rows, texts)]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "pathqabench_open_answers.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers)
        self.log(f"open-ended answers for judging: {os.path.join(out_dir, 'pathqabench_open_answers.jsonl')}")
        return len(answers)
