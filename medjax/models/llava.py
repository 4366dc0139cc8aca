"""LLaVA (Liu et al., NeurIPS 2023; LLaVA-1.5, CVPR 2024) and PathChat (Lu et al., Nature 2024): a vision
encoder, a projector to the LLM width, and a Llama decoder reading the image embeddings spliced into its
token sequence, matching Hugging Face `LlavaForConditionalGeneration` (transformers 5.23).

    features = vision_tower(pixels) after `vision_tower.depth` layers (HF hidden_states[vision_feature_layer],
               the penultimate layer for LLaVA-1.5), class token dropped ("default" strategy)
    image    = linear_2(gelu_exact(linear_1(features)))            (LLaVA-1.5 `mlp2x_gelu`)
             | mlp(attention_pool(features, learned queries))       (PathChat's projector, `projector="attention_pool"`)
    logits   = Llama(embeds),  embeds = image[k] at the k-th `image_token_id` of a row, else embed_tokens(id)

The vision tower is built only up to the feature layer (CLIP's post-layernorm is unused). Each row holds
exactly `num_image_tokens` image tokens (the processor's static positions), one image per row. The vision
tower is any module mapping (batch, H, W, 3) to (batch, tokens, width) (CLIP ViT-L/14 or UNI's ViT-L/16).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn import transformer
from medjax.nn.llama import Cache, Llama

Dtype = Any


class AttentionPoolProjector(nn.Module):
    """PathChat's projector (Lu et al. 2024, Methods): `num_queries` learned queries cross-attend to the patch
    features, then an MLP (Linear -> GELU -> Linear) to the LLM width. Our choice: one attention layer with
    pre-LayerNorm on queries and keys, as in Flamingo's / BLIP-2's resamplers (the paper gives no layer count)."""

    num_queries: int
    out_features: int
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        width = features.shape[-1]
        queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                             (self.num_queries, width), self.param_dtype)
        queries = jnp.broadcast_to(queries.astype(self.dtype), (features.shape[0],) + queries.shape)
        norm = lambda name: transformer.layer_norm(self.dtype, self.param_dtype, name)  # noqa: E731
        pooled = transformer.MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                                name="attn")(norm("norm_q")(queries), norm("norm_kv")(features))
        hidden = transformer.dense(self.out_features, ("embed", "mlp"), self.dtype, self.param_dtype, "linear_1")(pooled)
        return transformer.dense(self.out_features, ("mlp", "embed"), self.dtype, self.param_dtype, "linear_2")(
            transformer.activation("gelu")(hidden))


class MlpProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu` (HF `LlavaMultiModalProjector`): linear_2(act(linear_1(x))), both to the LLM width."""

    out_features: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        dense = lambda axes, name: transformer.dense(self.out_features, axes, self.dtype, self.param_dtype,  # noqa: E731
                                                     name, use_bias=self.use_bias)
        return dense(("mlp", "embed"), "linear_2")(transformer.activation(self.act)(dense(("embed", "mlp"), "linear_1")(features)))


class Llava(nn.Module):
    """`apply(variables, input_ids, pixel_values=PIX, attention_mask=None)` -> logits (batch, tokens, vocab)
    float32; PIX channels-last (batch, H, W, 3), normalised. Params: vision_tower, multi_modal_projector
    (linear_1, linear_2), language_model (a `Llama`'s)."""

    vision_tower: nn.Module
    language_model: Llama
    image_token_id: int = 32000
    keep_class_token: bool = False  # HF vision_feature_select_strategy "full"; "default" drops it
    projector: str = "mlp2x_gelu"  # or "attention_pool" (PathChat)
    projector_act: str = "gelu"  # exact (erf) GELU, as HF's ACT2FN["gelu"]
    projector_bias: bool = True
    num_queries: int = 128  # attention_pool: image tokens per image (our choice for PathChat's resampler)
    freeze_vision: bool = True  # stop gradients at the vision features (LLaVA / PathChat train no vision tower)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_image_tokens(self) -> int:
        if self.projector == "attention_pool":
            return self.num_queries
        grid = self.vision_tower.image_size // self.vision_tower.patch_size
        return grid * grid + (1 if self.keep_class_token else 0)

    def setup(self):
        width = self.language_model.width
        if self.projector == "mlp2x_gelu":
            self.multi_modal_projector = MlpProjector(width, self.projector_act, self.projector_bias, self.dtype,
                                                      self.param_dtype)
        elif self.projector == "attention_pool":
            self.multi_modal_projector = AttentionPoolProjector(self.num_queries, width, dtype=self.dtype,
                                                                param_dtype=self.param_dtype)
        else:
            raise ValueError(f"medjax/models/llava.py Llava.projector={self.projector!r}; expected 'mlp2x_gelu' or "
                             "'attention_pool'")

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(batch, num_image_tokens, LLM width): the projected vision features."""
        features = self.vision_tower(pixel_values)
        if not self.keep_class_token:
            features = features[:, 1:]
        if self.freeze_vision:
            features = jax.lax.stop_gradient(features)
        return self.multi_modal_projector(features)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Token embeddings with the k-th image token of each row replaced by that row's k-th image feature."""
        is_image = input_ids == self.image_token_id
        text = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if pixel_values is None:
            return text
        check_image_tokens(input_ids, self.image_token_id, self.num_image_tokens)
        image = self.image_features(pixel_values).astype(text.dtype)
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image.shape[1] - 1)
        gathered = jnp.take_along_axis(image, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, text)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, position_ids: jax.Array | None = None) -> jax.Array:
        if pixel_values is None and self.is_initializing():
            raise ValueError("medjax/models/llava.py Llava.init needs pixel_values to create the vision params")
        return self.language_model.forward_embeds(self.embed(input_ids, pixel_values), attention_mask, position_ids)

    def init_cache(self, batch: int, length: int, dtype: Dtype | None = None) -> Cache:
        return self.language_model.init_cache(batch, length, dtype)

    def decode(self, input_ids: jax.Array, cache: Cache, cache_index: jax.Array, kv_mask: jax.Array,
               position_ids: jax.Array, pixel_values: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """`Llama.decode` on the spliced embeddings (the prompt chunk carries the pixels; later tokens none)."""
        return self.language_model.decode_embeds(self.embed(input_ids, pixel_values), cache, cache_index, kv_mask,
                                                 position_ids)


def check_image_tokens(input_ids: jax.Array, image_token_id: int, expected: int) -> None:
    """Raise when concrete `input_ids` rows do not each hold `expected` image tokens (traced ids: unchecked)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    counts = np.sum(np.asarray(input_ids) == image_token_id, axis=1)
    if np.any(counts != expected):
        raise ValueError(f"medjax/models/llava.py: every row of input_ids must hold exactly {expected} image tokens "
                         f"(id {image_token_id}), one per image feature; found {counts.tolist()}")
