"""PTUnifier (Chen, Diao, Wang, Li, Wan, "Towards Unifying Medical Vision-and-Language Pre-training via
Soft Prompts", ICCV 2023): a METER-style fusion encoder whose missing modality is replaced by soft
prompts drawn from a pool, so image+text, image-only and text-only inputs share one backbone.

    image tokens  V = ln_post(CLIP-ViT(X^v)) W_v + type[1]      X^v = [cls; patches] + pos     (Sec. 3.3)
    text tokens   L = RoBERTa(X^l) W_l + type[0]                 X^l = [<s>; words; </s>] + pos
    image missing: X^v = [cls + pos_0; PT^v],  PT^v = top-49 of the visual pool by  w^T mean(X^l[1:])
    text missing:  X^l = [emb(<s>); PT^l; emb(</s>)],  PT^l = top-32 of the textual pool by  w^T mean(X^v[1:])
    6 co-attention blocks (self-attn, cross-attn to the other stream, FFN; both streams in parallel)
    joint feature = [tanh(W L_0); tanh(W V_0)]   (1536 for hidden 768)

Heads: MLM (BERT prediction-head transform + untied decoder over the vocabulary), ITM (Linear(1536, 2)),
ITC (LayerNorm(1536) -> Linear(1536, 768), per modality; normalised by the loss). The prompt sequences
follow the released code exactly: prompts get no position embedding; the </s> embedding is computed as a
length-1 sequence (so it carries the first position's embedding); the text query is the masked mean of
the text embeddings after the first token, the image query the mean of patch + position embeddings.
The released code's CLIP builder (METER's) keeps 12 - 1 = 11 transformer blocks and applies ln_post to
every token; `vision_depth=11` in the full configuration reproduces that.

Initialisation: every module outside the two towers (projections, modality types, co-attention layers,
poolers, heads) starts as the original's `objectives.init_weights` (METER's) leaves it: Linear and Embedding
weights N(0, 0.02), biases 0, LayerNorm (1, 0), the initialisers of those modules (`INIT`; the towers keep
their own initialisation, or the pretrained weights). Measured on the demo (issue #23): with the
Glorot-uniform kernels instead, the fused features of different samples start misaligned (ITC above ln B) and
the first steps collapse them (cosine 0.78 -> 0.98 within 10 steps), so ITC sat at ln B for the demo's run.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.prompt_pool import PromptPool
from medjax.nn.bert import BertEncoder
from medjax.nn.clip_vit import CLIPVisionTransformer, activation, dense, layer_norm
from medjax.nn.co_attention import CoAttentionBlock

Dtype = Any

# The paper's pretraining configuration (released run script: clip16, text_roberta, image_size=288,
# max_text_len=48, BioMed-RoBERTa-base; config.py: 6 top layers, hidden 768, 12 heads, pools 2048, 49 / 32).
PTUNIFIER_FULL = dict(
    image_size=288, patch_size=16, vision_width=768, vision_depth=11, vision_heads=12, vision_mlp_dim=3072,
    vocab_size=50265, text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072, max_positions=514,
    pad_token_id=1, cls_token_id=0, sep_token_id=2, roberta_positions=True, text_layer_norm_eps=1e-5,
    hidden_size=768, fusion_layers=6, fusion_heads=12, fusion_mlp_dim=3072, fusion_layer_norm_eps=1e-5,
    dropout=0.1, pool_size=2048, num_visual_prompts=49, num_textual_prompts=32, prompts_trainable=True,
)
PTUNIFIER_TINY = dict(
    PTUNIFIER_FULL, image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, vision_mlp_dim=64,
    vocab_size=64, text_width=32, text_depth=1, text_heads=2, text_mlp_dim=64, max_positions=40,
    hidden_size=32, fusion_layers=2, fusion_heads=2, fusion_mlp_dim=64, pool_size=16, num_visual_prompts=4,
    num_textual_prompts=3,
)
# The original's `objectives.init_weights` (METER's) on every module outside the towers: Linear and Embedding
# weights `module.weight.data.normal_(mean=0.0, std=0.02)`, biases zero, LayerNorm (1, 0).
INIT_STD = 0.02
INIT = nn.initializers.normal(INIT_STD)


class PTUnifier(nn.Module):
    """The PTUnifier backbone and pretraining heads; fields default to the paper's configuration.

    Paths: `infer` (image + text), `infer_text_only` (image missing: visual prompts), `infer_image_only`
    (text missing: textual prompts); each returns {"text_feats", "image_feats", "cls_feats"}. Heads:
    `mlm_logits`, `itm_logits`, `itc_features`. `pretraining_outputs` computes all three objectives' inputs
    sharing the unimodal towers; `__call__` (used by init) runs it on matched pairs.
    """

    image_size: int = 288
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 11
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vocab_size: int = 50265
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    max_positions: int = 514
    pad_token_id: int = 1
    cls_token_id: int = 0  # RoBERTa <s>
    sep_token_id: int = 2  # RoBERTa </s>
    roberta_positions: bool = True  # RoBERTa position ids (from pad_token_id); False: BERT's 0..T-1
    text_layer_norm_eps: float = 1e-5
    hidden_size: int = 768
    fusion_layers: int = 6
    fusion_heads: int = 12
    fusion_mlp_dim: int = 3072
    fusion_layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    pool_size: int = 2048
    num_visual_prompts: int = 49
    num_textual_prompts: int = 32
    prompts_trainable: bool = True
    # Layout, not architecture: nn.scan over each tower's layers (params under vision/layers, text/layers with
    # a leading layer axis); None: towers of >= 12 layers. medjax.convert.ptunifier maps either layout.
    scan: bool | str | None = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.vision_width != self.text_width:
            raise ValueError(f"medjax/models/ptunifier.py PTUnifier: vision_width={self.vision_width} and text_width="
                             f"{self.text_width} must agree (each pool is queried by the other modality's embeddings)")
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision = CLIPVisionTransformer(self.image_size, self.patch_size, self.vision_width, self.vision_depth,
                                            self.vision_heads, self.vision_mlp_dim, scan=self.scan, **kinds)
        self.text = BertEncoder(self.vocab_size, self.text_width, self.text_depth, self.text_heads, self.text_mlp_dim,
                                self.max_positions, type_vocab_size=1 if self.roberta_positions else 2,
                                layer_norm_eps=self.text_layer_norm_eps, hidden_dropout=self.dropout,
                                attention_dropout=self.dropout,
                                position_padding_idx=self.pad_token_id if self.roberta_positions else None,
                                add_pooling_layer=False, scan=self.scan, **kinds)
        self.text_proj = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.image_proj = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.modality_type = nn.Embed(2, self.hidden_size, embedding_init=nn.with_logical_partitioning(
            INIT, (None, "embed")), **kinds)
        self.fusion = [CoAttentionBlock(self.fusion_heads, self.fusion_mlp_dim, "gelu", self.fusion_layer_norm_eps,
                                        self.dropout, self.dropout, kernel_init=INIT, **kinds)
                       for _ in range(self.fusion_layers)]
        self.text_pooler = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.image_pooler = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        # Sec. 3.2: V (visual prompts, width of the image embeddings) and T (textual prompts).
        self.visual_prompts = PromptPool(self.pool_size, self.vision_width, self.prompts_trainable, **kinds)
        self.textual_prompts = PromptPool(self.pool_size, self.text_width, self.prompts_trainable, **kinds)
        # MLM head (BertPredictionHeadTransform + untied decoder + bias), ITM head, ITC projections.
        self.mlm_transform = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.mlm_norm = layer_norm(self.fusion_layer_norm_eps, self.dtype, self.param_dtype)
        self.mlm_decoder = dense(self.vocab_size, ("embed", "vocab"), self.dtype, self.param_dtype, use_bias=False,
                                 kernel_init=INIT)
        self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                                   (self.vocab_size,), self.param_dtype)
        self.itm_head = dense(2, ("embed", "classes"), self.dtype, self.param_dtype, kernel_init=INIT)
        self.itc_image_norm = layer_norm(1e-5, self.dtype, self.param_dtype)  # CLIP's LayerNorm (eps 1e-5)
        self.itc_text_norm = layer_norm(1e-5, self.dtype, self.param_dtype)
        self.itc_image_proj = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, use_bias=False,
                                    kernel_init=INIT)
        self.itc_text_proj = dense(self.hidden_size, ("embed", None), self.dtype, self.param_dtype, use_bias=False,
                                   kernel_init=INIT)

    # ---- unimodal encoders -------------------------------------------------------------------------
    def _check_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> None:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"medjax/models/ptunifier.py PTUnifier: input_ids {input_ids.shape} and attention_mask "
                             f"{attention_mask.shape} must both be (batch, length)")

    def encode_image_tokens(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Embedded image tokens -> ln_pre, CLIP blocks, ln_post on every token, projection (batch, N, hidden)."""
        return self.image_proj(self.vision.ln_post(self.vision.encode(tokens, train=train)))

    def encode_text_tokens(self, embeddings: jax.Array, mask: jax.Array | None, *, train: bool = False) -> jax.Array:
        """Text embeddings -> RoBERTa layers, projection (batch, T, hidden)."""
        return self.text_proj(self.text.encode(embeddings, mask, train=train))

    # ---- missing-modality sequences (Sec. 3.2) -----------------------------------------------------
    def visual_prompt_sequence(self, text_embeddings: jax.Array, attention_mask: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
        """Image missing: [cls + pos_0; PT^v] (batch, 1 + k, width) and the prompt indices, PT^v chosen by the
        masked mean of the text embeddings after the first token."""
        mask = attention_mask[:, 1:, None].astype(text_embeddings.dtype)
        query = (text_embeddings[:, 1:] * mask).sum(1) / (mask.sum(1) + 1e-8)
        prompts, indices = self.visual_prompts(query, self.num_visual_prompts)
        cls = jnp.broadcast_to(self.vision.class_token()[None, None], (prompts.shape[0], 1, self.vision_width))
        return jnp.concatenate([cls.astype(prompts.dtype), prompts], axis=1), indices

    def textual_prompt_sequence(self, image_embeddings: jax.Array, *, train: bool = False
                                ) -> tuple[jax.Array, jax.Array]:
        """Text missing: [emb(<s>); PT^l; emb(</s>)] (batch, 2 + k, width) and the prompt indices, PT^l chosen by
        the mean of the patch + position embeddings (class token excluded)."""
        prompts, indices = self.textual_prompts(image_embeddings[:, 1:].mean(1), self.num_textual_prompts)
        batch = prompts.shape[0]
        special = lambda token: self.text.embed(jnp.full((batch, 1), token, jnp.int32), train=train)  # noqa: E731
        tokens = jnp.concatenate([special(self.cls_token_id), prompts.astype(image_embeddings.dtype),
                                  special(self.sep_token_id)], axis=1)
        return tokens, indices

    def visual_prompt_tokens(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                             train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(text embeddings, image-missing sequence, indices) from token ids."""
        self._check_text(input_ids, attention_mask)
        embeddings = self.text.embed(input_ids, train=train)
        return (embeddings, *self.visual_prompt_sequence(embeddings, attention_mask))

    def textual_prompt_tokens(self, images: jax.Array, *, train: bool = False
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embeddings, text-missing sequence, indices) from images."""
        image_embeddings = self.vision.embed(images)
        return (image_embeddings, *self.textual_prompt_sequence(image_embeddings, train=train))

    # ---- fusion ------------------------------------------------------------------------------------
    def fuse(self, text: jax.Array, text_mask: jax.Array | None, image: jax.Array, *,
             train: bool = False) -> dict[str, jax.Array]:
        """Projected streams -> modality types, co-attention blocks, poolers (METER/PTUnifier `infer`)."""
        text = text + self.modality_type(jnp.zeros(text.shape[:2], jnp.int32))
        image = image + self.modality_type(jnp.ones(image.shape[:2], jnp.int32))
        for block in self.fusion:
            text, image = block(text, image, text_mask, None, train=train)
        cls = jnp.concatenate([jnp.tanh(self.text_pooler(text[:, 0])), jnp.tanh(self.image_pooler(image[:, 0]))], -1)
        return {"text_feats": text, "image_feats": image, "cls_feats": cls}

    def infer(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
              train: bool = False) -> dict[str, jax.Array]:
        """Image + text: X = (X^v, X^l)."""
        self._check_text(input_ids, attention_mask)
        text = self.encode_text_tokens(self.text.embed(input_ids, train=train), attention_mask, train=train)
        image = self.encode_image_tokens(self.vision.embed(images), train=train)
        return self.fuse(text, attention_mask, image, train=train)

    def infer_text_only(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                        train: bool = False) -> dict[str, jax.Array]:
        """Image missing: X = (PT^v, X^l), the visual prompts selected by the text."""
        embeddings, image_tokens, _ = self.visual_prompt_tokens(input_ids, attention_mask, train=train)
        text = self.encode_text_tokens(embeddings, attention_mask, train=train)
        return self.fuse(text, attention_mask, self.encode_image_tokens(image_tokens, train=train), train=train)

    def infer_image_only(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Text missing: X = (X^v, PT^l), the textual prompts selected by the image (all text tokens valid)."""
        image_embeddings, text_tokens, _ = self.textual_prompt_tokens(images, train=train)
        text = self.encode_text_tokens(text_tokens, None, train=train)
        return self.fuse(text, None, self.encode_image_tokens(image_embeddings, train=train), train=train)

    # ---- heads -------------------------------------------------------------------------------------
    def mlm_logits(self, text_feats: jax.Array) -> jax.Array:
        """(batch, T, hidden) -> (batch, T, vocab): dense, GELU, LayerNorm, decoder + bias."""
        h = self.mlm_norm(activation("gelu")(self.mlm_transform(text_feats)))
        return self.mlm_decoder(h) + self.mlm_bias.astype(h.dtype)

    def itm_logits(self, cls_feats: jax.Array) -> jax.Array:
        """(batch, 2 hidden) -> (batch, 2): [not matched, matched]."""
        return self.itm_head(cls_feats)

    def itc_features(self, image_cls_feats: jax.Array, text_cls_feats: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Joint features of the image-only and text-only paths -> unnormalised ITC embeddings (batch, hidden)."""
        return (self.itc_image_proj(self.itc_image_norm(image_cls_feats)),
                self.itc_text_proj(self.itc_text_norm(text_cls_feats)))

    def pretraining_outputs(self, images: jax.Array, input_ids: jax.Array, mlm_input_ids: jax.Array,
                            attention_mask: jax.Array, itm_images: jax.Array, *, with_itc: bool = True,
                            train: bool = False) -> dict[str, jax.Array]:
        """MLM logits on (image b, masked text b), ITM logits on (image itm_images[b], clean text b) and, with
        ITC, the ITC features of the image-only / text-only paths, with shared unimodal work: the image tower
        runs once (the ITM images are gathered from its output, the image-only path reuses it) and the text
        tower once on [masked; clean] (the text-only path reuses the clean half). Equal to `infer`,
        `infer_image_only` and `infer_text_only` called separately, except that in training the text-only
        path shares the ITM pass's dropout masks in the text tower."""
        self._check_text(input_ids, attention_mask)
        batch = input_ids.shape[0]
        image_embeddings = self.vision.embed(images)
        image = self.encode_image_tokens(image_embeddings, train=train)
        masks = jnp.concatenate([attention_mask, attention_mask], 0)
        text_embeddings = self.text.embed(jnp.concatenate([mlm_input_ids, input_ids], 0), train=train)
        text = self.encode_text_tokens(text_embeddings, masks, train=train)
        both = self.fuse(text, masks, jnp.concatenate([image, jnp.take(image, itm_images, axis=0)], 0), train=train)
        out = {"mlm_logits": self.mlm_logits(both["text_feats"][:batch]),
               "itm_logits": self.itm_logits(both["cls_feats"][batch:])}
        if with_itc:
            prompt_image, _ = self.visual_prompt_sequence(text_embeddings[batch:], attention_mask)
            text_only = self.fuse(text[batch:], attention_mask, self.encode_image_tokens(prompt_image, train=train),
                                  train=train)
            prompt_text, _ = self.textual_prompt_sequence(image_embeddings, train=train)
            image_only = self.fuse(self.encode_text_tokens(prompt_text, None, train=train), None, image, train=train)
            out["itc_image"], out["itc_text"] = self.itc_features(image_only["cls_feats"], text_only["cls_feats"])
        return out

    def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """Every head on matched pairs (creates all params at init): `pretraining_outputs` with itm_images = b."""
        return self.pretraining_outputs(images, input_ids, input_ids, attention_mask,
                                        jnp.arange(input_ids.shape[0]), train=train)


def ptunifier_from_config(cfg, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> PTUnifier:
    """PTUnifier from a config mapping with PTUNIFIER_FULL's keys (extra keys are ignored; missing ones error)."""
    missing = sorted(k for k in PTUNIFIER_FULL if k not in cfg)
    if missing:
        raise ValueError(f"medjax/models/ptunifier.py: model config lacks {missing}")
    return PTUnifier(**{k: cfg[k] for k in PTUNIFIER_FULL}, dtype=dtype, param_dtype=param_dtype)
