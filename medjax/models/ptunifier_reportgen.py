"""PTUnifier report generation and summarisation (Chen et al., ICCV 2023, Sec. 4, generation table; the
original's `compute_clm`, `clm_proj` and `clm_head` = `BertGenerationDecoder`): a Transformer decoder
cross-attending to the fused features of the backbone.

    E   = LN(W_c [V^fused; L^fused] + b)                           clm_proj: Linear(H, D) -> LayerNorm
    h_0 = RoBERTa embeddings of y_<t                               (copied from the text encoder at init)
    h_l = FFN(CrossAttn(CausalSelfAttn(h_{l-1}), E))               post-LN decoder layers (copied self-attn/FFN)
    p(y_t | y_<t, X) = softmax(W_lm LN(GELU(W h_L)) + b)           lm head (copied from the MLM head)

The fused streams come from the path of `mode`: "vision" (image + textual prompts: report generation,
findings from the image), "language" (findings + visual prompts: summarisation to the impression),
"vision_language" (image + findings -> impression). As the original, the decoder attends to every fused
token (no encoder mask, the text padding included), its positions are RoBERTa's (from the pad id), and
the loss is token cross-entropy of logits[:, :-1] against ids[:, 1:] ignoring padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.ptunifier import INIT, PTUNIFIER_FULL
from medjax.models.ptunifier_finetune import PTUnifierFinetune
from medjax.nn.bert import roberta_position_ids
from medjax.nn.clip_vit import TOKENS, activation, dense, layer_norm
from medjax.nn.co_attention import CoAttentionLayer

MODES = ("vision", "language", "vision_language")


class ReportDecoder(nn.Module):
    """RoBERTa embeddings, `depth` causal decoder layers with cross-attention, and an MLM-style lm head
    (HF `BertGenerationDecoder` with RoBERTa embeddings, as the original builds it). Param names follow
    the text encoder's (word/position/token_type_embeddings, embedding_norm; per layer self_attention,
    cross_attention, fc1, fc2 and norms) so the encoder's weights copy over."""

    vocab_size: int
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 514
    pad_token_id: int = 1
    roberta_positions: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        embed = lambda count, axes: nn.Embed(  # noqa: E731
            count, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(INIT, axes))
        self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(self.max_positions, (None, "embed"))
        self.token_type_embeddings = embed(1, (None, "embed"))
        self.embedding_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        self.embedding_dropout = nn.Dropout(self.dropout)
        self.layers = [CoAttentionLayer(self.num_heads, self.mlp_dim, "gelu", self.layer_norm_eps, self.dropout,
                                        self.dropout, causal=True, dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=INIT)
                       for _ in range(self.depth)]
        self.lm_transform = dense(self.width, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.lm_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        self.lm_decoder = dense(self.vocab_size, ("embed", "vocab"), self.dtype, self.param_dtype, use_bias=False,
                                kernel_init=INIT)
        self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                                  (self.vocab_size,), self.param_dtype)

    def __call__(self, input_ids: jax.Array, encoder_states: jax.Array, attention_mask: jax.Array | None = None,
                 position: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """(batch, T) token ids, (batch, S, width) encoder states -> (batch, T, vocab) next-token logits, or
        with `position` (a scalar) only that position's (batch, vocab) (the lm head on one token: decoding)."""
        if input_ids.ndim != 2 or encoder_states.ndim != 3 or encoder_states.shape[0] != input_ids.shape[0]:
            raise ValueError(f"medjax/models/ptunifier_reportgen.py ReportDecoder: expected ids (batch, T) and encoder "
                             f"states (batch, S, {self.width}); got {input_ids.shape} and {encoder_states.shape}")
        if self.roberta_positions:
            positions = roberta_position_ids(input_ids, self.pad_token_id)
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        h = (self.word_embeddings(input_ids) + self.token_type_embeddings(jnp.zeros_like(input_ids))
             + self.position_embeddings(positions))
        h = nn.with_logical_constraint(self.embedding_dropout(self.embedding_norm(h), deterministic=not train), TOKENS)
        for layer in self.layers:
            h = layer(h, encoder_states, attention_mask, None, train=train)
        if position is not None:
            h = jax.lax.dynamic_index_in_dim(h, position, axis=1, keepdims=False)
        h = self.lm_norm(activation("gelu")(self.lm_transform(h)))
        return self.lm_decoder(h) + self.lm_bias.astype(h.dtype)


class PTUnifierReportGen(PTUnifierFinetune):
    """The PTUnifier backbone (and its pretraining heads, so a pretraining run loads path for path) plus
    `clm_proj` and the report decoder; `mode` picks the input path (MODES)."""

    mode: str = "vision"
    decoder_layers: int = 12  # the original: the text encoder's depth (its layers initialise the decoder)

    def setup(self):
        super().setup()
        if self.mode not in MODES:
            raise ValueError(f"medjax/models/ptunifier_reportgen.py: mode={self.mode!r}; expected one of {MODES}")
        self.clm_proj = dense(self.text_width, ("embed", None), self.dtype, self.param_dtype, kernel_init=INIT)
        self.clm_norm = layer_norm(1e-5, self.dtype, self.param_dtype)  # torch nn.LayerNorm's default eps
        self.report_decoder = ReportDecoder(
            self.vocab_size, self.text_width, self.decoder_layers, self.text_heads, self.text_mlp_dim,
            self.max_positions, self.pad_token_id, self.roberta_positions, self.text_layer_norm_eps, self.dropout,
            self.dtype, self.param_dtype)

    def encoder_states(self, images, input_ids, attention_mask, *, train: bool = False) -> jax.Array:
        """clm_proj([image_feats; text_feats]) (batch, N + T, width) of the `mode` path."""
        if self.mode == "vision":
            out = self.infer_image_only(images, train=train)
        elif self.mode == "language":
            out = self.infer_text_only(input_ids, attention_mask, train=train)
        else:
            out = self.infer(images, input_ids, attention_mask, train=train)
        fused = jnp.concatenate([out["image_feats"], out["text_feats"]], axis=1)
        return self.clm_norm(self.clm_proj(fused))

    def decode(self, encoder_states, target_ids, target_mask=None, *, train: bool = False) -> jax.Array:
        """Teacher-forced logits (batch, T, vocab) of `target_ids` given the encoder states."""
        return self.report_decoder(target_ids, encoder_states, target_mask, train=train)

    def next_token_logits(self, encoder_states, token_ids, position) -> jax.Array:
        """(batch, vocab) logits of the token after `position` (decoding; later tokens are masked out)."""
        return self.report_decoder(token_ids, encoder_states, None, position)

    def report_logits(self, images, input_ids, attention_mask, target_ids, target_mask, *, train: bool = False):
        return self.decode(self.encoder_states(images, input_ids, attention_mask, train=train), target_ids,
                           target_mask, train=train)

    def __call__(self, images, input_ids, attention_mask, *, train: bool = False):
        """Every backbone path and head plus the decoder on `input_ids` (creates all params at init)."""
        out = super().__call__(images, input_ids, attention_mask, train=train)
        states = self.clm_norm(self.clm_proj(self.infer(images, input_ids, attention_mask, train=train)["text_feats"]))
        out["report_logits"] = self.decode(states, input_ids, attention_mask, train=train)
        return out


def reportgen_model_from_config(cfg, mode: str, decoder_layers: int, dtype=jnp.float32) -> PTUnifierReportGen:
    """The report-generation model from a `model` block with PTUNIFIER_FULL's keys."""
    missing = sorted(k for k in PTUNIFIER_FULL if k not in cfg)
    if missing:
        raise ValueError(f"medjax/models/ptunifier_reportgen.py: model config lacks {missing}")
    return PTUnifierReportGen(**{k: cfg[k] for k in PTUNIFIER_FULL}, num_outputs=0, mode=str(mode),
                              decoder_layers=int(decoder_layers), dtype=dtype)
