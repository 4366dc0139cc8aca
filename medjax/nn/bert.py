"""BERT / RoBERTa Transformer encoder (Devlin et al., NAACL 2019, Sec. 3 and Fig. 2; Liu et al., 2019,
RoBERTa), matching Hugging Face's `BertModel` / `RobertaModel` (transformers 5.23) number for number.

    x = LN(word[input_ids] + token_type[token_type_ids] + position[position_ids])     (BERT Fig. 2)
    per layer (post-LN, Vaswani et al., 2017, Sec. 3.1):
        x = LN(x + attn(x, padding mask));  x = LN(x + fc2(GELU(fc1(x))))
    last_hidden_state = x;  pooled = tanh(dense(x[:, 0]))

Position ids are 0..T-1 (BERT), or with `position_padding_idx` set RoBERTa's fairseq `make_positions`:
non-padding tokens get padding_idx + 1, padding_idx + 2, ... counted over the non-padding tokens of
`input_ids` (cumsum of input_ids != padding_idx), padding tokens get padding_idx.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn import layer_stack
from medjax.nn.clip_vit import TOKENS, dense, layer_norm

Dtype = Any


def roberta_position_ids(input_ids: jax.Array, padding_idx: int) -> jax.Array:
    """HF `create_position_ids_from_input_ids`: cumsum(ids != pad) * (ids != pad) + pad."""
    not_pad = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + padding_idx


def bert_layer_fields(num_heads: int, mlp_dim: int, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12,
                      hidden_dropout: float = 0.1, attention_dropout: float = 0.1) -> dict:
    """`transformer.TransformerBlock` fields of one post-LN BERT layer: LN(x + attention), LN(x + MLP), dropout
    before each residual sum; params attention/{query,key,value,out}, attention_norm, fc1, fc2, output_norm."""
    return dict(num_heads=num_heads, mlp_dim=mlp_dim, activation=hidden_act, layer_norm_eps=layer_norm_eps,
                hidden_dropout=hidden_dropout, attention_dropout=attention_dropout, pre_norm=False, mlp_bias_std=0.0,
                norm_names=("attention_norm", "output_norm", "norm_kv"), mlp_name=None, attention_name="attention")


class BertEncoder(nn.Module):
    """BERT/RoBERTa encoder; `__call__(input_ids, attention_mask)` returns HF's `last_hidden_state`.

    `pooled_output` is HF's `pooler_output` (when `add_pooling_layer`). `embed` / `encode` split the
    forward pass so that a model can run the layers on embeddings it assembled itself.
    """

    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    position_padding_idx: int | None = None  # RoBERTa: the pad token id; None: BERT positions 0..T-1
    add_pooling_layer: bool = True
    scan: bool | str | None = False  # nn.scan over the layers (params under `layers`); off: the converters' layout
    remat: bool | str = "none"  # layer_stack.REMAT_POLICIES name or "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"medjax/nn/bert.py BertEncoder: num_heads={self.num_heads} must divide "
                             f"width={self.width}")
        embed = lambda count, axes: nn.Embed(  # noqa: E731
            count, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))
        self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(self.max_positions, (None, "embed"))
        self.token_type_embeddings = embed(self.type_vocab_size, (None, "embed"))
        self.embedding_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        self.embedding_dropout = nn.Dropout(self.hidden_dropout)
        # Unrolled: layers_0, layers_1, ...; scanned: one "layers" whose params have a leading layer axis.
        self.layers = layer_stack.block_stack(
            self.depth, [0.0] * self.depth, scan=layer_stack.resolve_scan(self.scan, self.depth),
            remat=layer_stack.resolve_remat(self.remat), dtype=self.dtype, param_dtype=self.param_dtype,
            **bert_layer_fields(self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps,
                                self.hidden_dropout, self.attention_dropout))
        if self.add_pooling_layer:
            self.pooler = dense(self.width, ("embed", None), self.dtype, self.param_dtype)

    def _check(self, input_ids: jax.Array, other: jax.Array | None, name: str) -> None:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"medjax/nn/bert.py BertEncoder: input_ids must be integer (batch, length), got "
                             f"{input_ids.dtype}{input_ids.shape}")
        if other is not None and other.shape != input_ids.shape:
            raise ValueError(f"medjax/nn/bert.py BertEncoder: {name} shape {other.shape} differs from input_ids "
                             f"shape {input_ids.shape}")

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        if self.position_padding_idx is not None:
            return roberta_position_ids(input_ids, self.position_padding_idx)
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
              position_ids: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """LN(word + token type + position embeddings), dropout: (batch, length, width)."""
        self._check(input_ids, token_type_ids, "token_type_ids")
        self._check(input_ids, position_ids, "position_ids")
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=not train)
        return nn.with_logical_constraint(x, TOKENS)

    def encode(self, hidden: jax.Array, attention_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """The encoder layers; `attention_mask` (batch, length) 1 = token, 0 = padding (masked as a key)."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.width:
            raise ValueError(f"medjax/nn/bert.py BertEncoder.encode: expected (batch, length, {self.width}), got "
                             f"{hidden.shape}")
        if attention_mask is not None and attention_mask.shape != hidden.shape[:2]:
            raise ValueError(f"medjax/nn/bert.py BertEncoder.encode: attention_mask shape {attention_mask.shape} does "
                             f"not match the tokens {hidden.shape[:2]}")
        mask = None if attention_mask is None else (attention_mask[:, None, None, :] > 0)
        hidden, _ = layer_stack.run_stack(self.layers, hidden, [0.0] * self.depth, mask=mask, train=train)
        return hidden

    def pool(self, last_hidden_state: jax.Array) -> jax.Array:
        if not self.add_pooling_layer:
            raise ValueError("medjax/nn/bert.py BertEncoder: this encoder has no pooler (add_pooling_layer=False)")
        return jnp.tanh(self.pooler(last_hidden_state[:, 0]))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        """(batch, length) ids and 1/0 mask -> last_hidden_state (batch, length, width)."""
        self._check(input_ids, attention_mask, "attention_mask")
        last_hidden_state = self.encode(self.embed(input_ids, token_type_ids, position_ids, train=train),
                                        attention_mask, train=train)
        if self.is_initializing() and self.add_pooling_layer:  # create the pooler params
            self.pool(last_hidden_state)
        return last_hidden_state

    def pooled_output(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                      train: bool = False) -> jax.Array:
        """(batch, width): HF `BertModel(...).pooler_output` = tanh(dense(first token))."""
        return self.pool(self(input_ids, attention_mask, token_type_ids, position_ids, train=train))
