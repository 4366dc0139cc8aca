"""CLIP text Transformer (Radford et al., ICML 2021, Sec. 2.4: a causally masked 63M-parameter
Transformer whose [EOS] activation, after a final LayerNorm, is linearly projected into the joint
space), matching Hugging Face's `CLIPTextModel` / `CLIPTextModelWithProjection` (transformers 5.23).

    x = token_embedding[input_ids] + position_embedding[0..T-1]
    x = pre-norm Transformer blocks(x, causal mask AND attention_mask)
    last_hidden_state = ln_final(x);  pooled = last_hidden_state[b, eos_b];  text_embeds = pooled @ W_proj

`eos_b` follows transformers 5.23 exactly: when the config's `eos_token_id` is 2 (the legacy value of
configs written before transformers PR #24773) it is argmax(input_ids[b]) (the EOT token has the
largest id in CLIP's vocabulary); otherwise the first position where input_ids[b] == eos_token_id
(position 0 when there is none).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn import layer_stack
from medjax.nn.clip_vit import TOKENS, clip_layer_fields, dense, layer_norm

Dtype = Any
LEGACY_EOS_TOKEN_ID = 2


# CLIP paper Sec. 2.4 / Table 20 (text encoders): width, layers, heads; MLP 4x width.
_TEXT_VARIANTS = {"B": (512, 12, 8), "L": (768, 12, 12)}


def clip_text_variant(name: str) -> dict:
    """CLIPTextTransformer fields for the text tower paired with ViT-"B/..." or ViT-"L/..."."""
    size = name.split("/")[0]
    if size not in _TEXT_VARIANTS:
        raise ValueError(f"medjax/nn/clip_text.py clip_text_variant: unknown variant {name!r}; expected 'B' or 'L' "
                         "(optionally followed by /<patch>)")
    width, depth, heads = _TEXT_VARIANTS[size]
    return {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": 4 * width}


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(batch,) index of the token whose state is pooled (transformers 5.23 `CLIPTextModel.forward`)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def causal_padding_mask(attention_mask: jax.Array | None, length: int) -> jax.Array:
    """Boolean (batch | 1, 1, T, T): query i sees key j iff j <= i and attention_mask[b, j] is set."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is None:
        return causal
    return causal & (attention_mask[:, None, None, :] > 0)


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder; `__call__(input_ids, attention_mask)` returns HF's `last_hidden_state`.

    `pooled_output` gives the EOS token's state (HF `pooler_output`); `text_embeds` its projection
    (present when `projection_dim` is set), e.g. for class-name embeddings:
    `model.apply(variables, ids, mask, method=model.text_embeds)`.
    """

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    eos_token_id: int = 49407
    projection_dim: int | None = None
    scan: bool | str | None = False  # nn.scan over the layers (params under `layers`); off: the converters' layout
    remat: bool | str = "none"  # layer_stack.REMAT_POLICIES name or "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"medjax/nn/clip_text.py CLIPTextTransformer: num_heads={self.num_heads} must divide "
                             f"width={self.width}")
        self.token_embedding = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.position_embedding = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), (self.max_length, self.width), self.param_dtype)
        # Unrolled: layers_0, layers_1, ...; scanned: one "layers" whose params have a leading layer axis.
        self.layers = layer_stack.block_stack(
            self.depth, [0.0] * self.depth, scan=layer_stack.resolve_scan(self.scan, self.depth),
            remat=layer_stack.resolve_remat(self.remat), dtype=self.dtype, param_dtype=self.param_dtype,
            **clip_layer_fields(self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps,
                                self.attention_dropout))
        self.ln_final = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
        if self.projection_dim is not None:
            self.projection = dense(self.projection_dim, ("embed", None), self.dtype, self.param_dtype,
                                    use_bias=False)

    def _check(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> None:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"medjax/nn/clip_text.py CLIPTextTransformer: input_ids must be integer (batch, length), "
                             f"got {input_ids.dtype}{input_ids.shape}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"medjax/nn/clip_text.py CLIPTextTransformer: sequence length {input_ids.shape[1]} "
                             f"exceeds max_length={self.max_length} (max_position_embeddings)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"medjax/nn/clip_text.py CLIPTextTransformer: attention_mask shape {attention_mask.shape} "
                             f"differs from input_ids shape {input_ids.shape}")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        """(batch, length) token ids and 1/0 mask -> last_hidden_state (batch, length, width)."""
        self._check(input_ids, attention_mask)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:length].astype(self.dtype)
        x = nn.with_logical_constraint(x, TOKENS)
        mask = causal_padding_mask(attention_mask, length)
        x, _ = layer_stack.run_stack(self.layers, x, [0.0] * self.depth, mask=mask, train=train)
        last_hidden_state = self.ln_final(x)
        if self.is_initializing() and self.projection_dim is not None:  # create the projection params
            self.project(self.pool(input_ids, last_hidden_state))
        return last_hidden_state

    def pool(self, input_ids: jax.Array, last_hidden_state: jax.Array) -> jax.Array:
        positions = eos_positions(input_ids, self.eos_token_id)
        return jnp.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]

    def project(self, pooled: jax.Array) -> jax.Array:
        if self.projection_dim is None:
            raise ValueError("medjax/nn/clip_text.py CLIPTextTransformer: this tower has no text projection "
                             "(projection_dim=None); use pooled_output")
        return self.projection(pooled)

    def pooled_output(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      train: bool = False) -> jax.Array:
        """(batch, width): HF `CLIPTextModel(...).pooler_output`, the EOS token's final state."""
        return self.pool(input_ids, self(input_ids, attention_mask, train=train))

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    train: bool = False) -> jax.Array:
        """(batch, projection_dim): HF `CLIPTextModelWithProjection(...).text_embeds` / `get_text_features`
        (not normalised)."""
        return self.project(self.pooled_output(input_ids, attention_mask, train=train))
