"""PTUnifier with its fine-tuning heads (Chen et al., ICCV 2023, Sec. 4; the original's `vqa_head`,
`mlc_head`, `cls_head`, `irtr_head`). The backbone is `PTUnifier` itself, so a pretraining run's params
load path for path and a pretraining checkpoint can be evaluated directly (zero-shot retrieval).

    VQA:            logits = head([tanh(W L_0); tanh(W V_0)])      image + question, BCE over answers
    MELINDA:        logits = head([tanh(W L_0); tanh(W V_0)])      figure + caption, CE over methods
    classification: logits = head(cls(X^v, PT^l))                  image only, textual prompts, BCE
    NLI:            logits = head(cls(PT^v, X^l))                  text pair only, visual prompts, CE
    retrieval:      s(I, T) = ITM logit "matched" of cls(X^v, X^l)  (the original initialises its
                    irtr_head from that row of the ITM head; scoring with the row itself is the same)
    head = Linear(2H, 2H) -> LayerNorm -> GELU -> Linear(2H, C), init N(0, 0.02), zero bias (METER).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.ptunifier import PTUNIFIER_FULL, PTUnifier
from medjax.nn.clip_vit import layer_norm


class ClassifierHead(nn.Module):
    """Linear(2H, 2H) -> LayerNorm -> GELU (exact) -> Linear(2H, C)."""

    num_outputs: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        zeros = nn.initializers.zeros_init()
        width = x.shape[-1]
        x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(zeros, ("mlp",)))(x)
        x = nn.gelu(layer_norm(1e-5, self.dtype, self.param_dtype, "norm")(x), approximate=False)
        return nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                        kernel_init=nn.with_logical_partitioning(init, ("mlp", "classes")),
                        bias_init=nn.with_logical_partitioning(zeros, ("classes",)))(x)


class PTUnifierFinetune(PTUnifier):
    """PTUnifier + a task head of `num_outputs` classes (VQA answers, labels, NLI classes); 0 = no task head
    (retrieval scores with the ITM head)."""

    num_outputs: int = 0

    def setup(self):
        super().setup()
        if self.num_outputs < 0:
            raise ValueError(f"medjax/models/ptunifier_finetune.py: num_outputs={self.num_outputs}; expected >= 0 "
                             "(0 = no task head)")
        if self.num_outputs:
            self.task_head = ClassifierHead(self.num_outputs, self.dtype, self.param_dtype)

    def joint_logits(self, images, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        """Image + text classification (VQA answers, MELINDA methods): the head on the joint feature."""
        return self.task_head(self.infer(images, input_ids, attention_mask, train=train)["cls_feats"])

    def vqa_logits(self, images, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        return self.joint_logits(images, input_ids, attention_mask, train=train)

    def image_logits(self, images, *, train: bool = False) -> jax.Array:
        """Vision-only classification: the text stream is the image-selected textual prompts."""
        return self.task_head(self.infer_image_only(images, train=train)["cls_feats"])

    def text_logits(self, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        """Language-only classification: the image stream is the text-selected visual prompts."""
        return self.task_head(self.infer_text_only(input_ids, attention_mask, train=train)["cls_feats"])

    def match_score(self, images, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        """(batch,) ITM "matched" logit of each (image, text) pair."""
        return self.itm_logits(self.infer(images, input_ids, attention_mask, train=train)["cls_feats"])[:, 1]

    def image_tokens(self, images, *, train: bool = False) -> jax.Array:
        """Projected image stream (B, N, H), computed once per image for all-pairs scoring."""
        return self.encode_image_tokens(self.vision.embed(images), train=train)

    def text_tokens(self, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        """Projected text stream (B, T, H), computed once per text for all-pairs scoring."""
        return self.encode_text_tokens(self.text.embed(input_ids, train=train), attention_mask, train=train)

    def fused_score(self, image_tokens, text_tokens, attention_mask, *, train: bool = False) -> jax.Array:
        """(batch,) ITM "matched" logit from the unimodal streams of aligned (image, text) pairs."""
        return self.itm_logits(self.fuse(text_tokens, attention_mask, image_tokens, train=train)["cls_feats"])[:, 1]

    def itc_image(self, images) -> jax.Array:
        """L2-normalised ITC embedding of images (image-only path)."""
        e = self.itc_image_proj(self.itc_image_norm(self.infer_image_only(images)["cls_feats"]))
        return e / jnp.linalg.norm(e.astype(jnp.float32), axis=-1, keepdims=True).astype(e.dtype)

    def itc_text(self, input_ids, attention_mask) -> jax.Array:
        """L2-normalised ITC embedding of texts (text-only path)."""
        e = self.itc_text_proj(self.itc_text_norm(self.infer_text_only(input_ids, attention_mask)["cls_feats"]))
        return e / jnp.linalg.norm(e.astype(jnp.float32), axis=-1, keepdims=True).astype(e.dtype)

    def __call__(self, images, input_ids, attention_mask, *, train: bool = False):
        """Every backbone path and head (creates all params at init), plus the task head."""
        out = super().__call__(images, input_ids, attention_mask, train=train)
        if self.num_outputs:
            out["task_logits"] = self.task_head(jnp.zeros((images.shape[0], 2 * self.hidden_size), self.dtype))
        return out


def finetune_model_from_config(cfg, num_outputs: int, dtype=jnp.float32) -> PTUnifierFinetune:
    """The fine-tuning model from a `model` block with PTUNIFIER_FULL's keys and a task head of `num_outputs`
    classes (0: none)."""
    missing = sorted(k for k in PTUNIFIER_FULL if k not in cfg)
    if missing:
        raise ValueError(f"medjax/models/ptunifier_finetune.py: model config lacks {missing}")
    return PTUnifierFinetune(**{k: cfg[k] for k in PTUNIFIER_FULL}, num_outputs=int(num_outputs), dtype=dtype)
