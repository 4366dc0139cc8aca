"""Co-attention fusion layer of METER (Dou et al., CVPR 2022, Sec. 3.2 and Fig. 3, "co-attention model")
as PTUnifier uses it (Chen et al., ICCV 2023, Sec. 3.1: the backbone's fusion module), matching the
original `BertCrossLayer` (METER's `bert_model.py`, kept unchanged in zhjohnchan/PTUnifier) number for
number. Each stream is one layer; the two streams of a block run in parallel on the same inputs:

    a = LN(x + Dropout(W_o SelfAttn(x, x_mask)))                   # BertAttention (self)
    c = LN(a + Dropout(W_o CrossAttn(q=a, kv=y, y_mask)))           # BertAttention (cross), keys from the other stream
    out = LN(c + Dropout(W_2 GELU(W_1 c)))                          # BertIntermediate + BertOutput

Post-LN as BERT (Devlin et al., 2019, Fig. 2); attention probabilities are dropped out (attention
dropout) and each sub-layer output before its residual sum (hidden dropout), both 0.1 in the paper's
configuration. Masks are (batch, tokens) 1/0 padding masks of the keys. With `causal` the same layer is a
Transformer decoder layer (HF RobertaLayer with is_decoder and add_cross_attention: causal self-attention,
cross-attention to the encoder states, FFN), as PTUnifier's report decoder uses it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.clip_vit import TOKENS, activation, dense, layer_norm
from medjax.nn.transformer import MultiHeadAttention

Dtype = Any


def key_padding_mask(mask: jax.Array | None) -> jax.Array | None:
    """(batch, kv_tokens) 1 = token, 0 = padding -> boolean (batch, 1, 1, kv_tokens), True = attend."""
    return None if mask is None else (mask[:, None, None, :] > 0)


class CoAttentionLayer(nn.Module):
    """One stream of a METER/PTUnifier co-attention block (BertCrossLayer): self-attention on `x`,
    cross-attention from `x` to the other stream `y`, feed-forward; post-LN residuals (see module doc).

    Submodules: self_attention (+ self_attention_norm), cross_attention (+ cross_attention_norm),
    fc1 / fc2 (+ output_norm). `x_mask` / `y_mask`: (batch, tokens) 1/0 key padding masks.
    """

    num_heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5  # RoBERTa's config (the fusion layers are built from the text encoder's config)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    causal: bool = False  # True: token i attends to tokens <= i in self-attention (a decoder layer, HF is_decoder)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = None  # the attention and FFN kernels' initialiser; None: Glorot-uniform

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, x_mask: jax.Array | None = None, y_mask: jax.Array | None = None,
                 *, train: bool = False) -> jax.Array:
        if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
            raise ValueError(f"medjax/nn/co_attention.py CoAttentionLayer: streams must be (batch, tokens, width) with "
                             f"the same batch and width; got {x.shape} and {y.shape}")
        x = nn.with_logical_constraint(x, TOKENS)
        norm = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        drop = lambda h: nn.Dropout(self.hidden_dropout)(h, deterministic=not train)  # noqa: E731
        attend = lambda name: MultiHeadAttention(  # noqa: E731  (medjax/nn/transformer.py, with a key mask)
            self.num_heads, dropout_rate=self.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name=name)
        self_mask = key_padding_mask(x_mask)
        if self.causal:
            tokens = x.shape[1]
            lower = jnp.tril(jnp.ones((tokens, tokens), bool))[None, None]
            self_mask = lower if self_mask is None else self_mask & lower
        h = attend("self_attention")(x, x, self_mask, train=train)
        x = norm("self_attention_norm")(x + drop(h))
        h = attend("cross_attention")(x, y, key_padding_mask(y_mask), train=train)
        x = norm("cross_attention_norm")(x + drop(h))
        h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1", kernel_init=self.kernel_init)(x)
        h = dense(x.shape[-1], ("mlp", "embed"), self.dtype, self.param_dtype, "fc2",
                  kernel_init=self.kernel_init)(activation(self.hidden_act)(h))
        x = norm("output_norm")(x + drop(h))
        return nn.with_logical_constraint(x, TOKENS)


class CoAttentionBlock(nn.Module):
    """Both streams of one fusion block, updated in parallel from the same inputs (the original's
    `x1 = text_layer(x, y, ...); y1 = image_layer(y, x, ...)`). Submodules `text` and `image`."""

    num_heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = None  # CoAttentionLayer.kernel_init

    @nn.compact
    def __call__(self, text: jax.Array, image: jax.Array, text_mask: jax.Array | None,
                 image_mask: jax.Array | None, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        fields = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, hidden_act=self.hidden_act,
                      layer_norm_eps=self.layer_norm_eps, hidden_dropout=self.hidden_dropout,
                      attention_dropout=self.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init)
        new_text = CoAttentionLayer(**fields, name="text")(text, image, text_mask, image_mask, train=train)
        new_image = CoAttentionLayer(**fields, name="image")(image, text, image_mask, text_mask, train=train)
        return new_text, new_image
