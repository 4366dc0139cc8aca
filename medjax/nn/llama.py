"""Llama 2 decoder (Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Sec. 2.2),
matching Hugging Face `LlamaForCausalLM` (transformers 5.23) number for number.

    h = embed_tokens(ids)
    per block:  h = h + o_proj(attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = RMSNorm(h)
                h = h + down_proj(silu(gate_proj(n)) * up_proj(n)),                 n = RMSNorm(h)
    logits = lm_head(RMSNorm(h))  (float32; untied unless `tie_embeddings`)

- RMSNorm (Zhang & Sennrich 2019): upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, times weight.
- RoPE (Su et al. 2021) in HF's rotate_half layout: inv_freq = theta^(-arange(0, hd, 2) / hd), cos/sin of
  concat(freqs, freqs), x * cos + rotate_half(x) * sin, applied to q and k before the KV-cache write.
- Grouped-query attention (Ainslie et al. 2023): query head j reads KV head j // (heads / kv_heads), scale
  hd^-1/2, softmax in fp32, causal and padding masks (left padding: position_ids = cumsum(mask) - 1).
- The layers are one `nn.scan` (params under `layers` with a leading "layers" axis) or unrolled
  (`layers_0`, ...), each with an `nn.remat` policy (`medjax.nn.layer_stack.REMAT_POLICIES`).
- KV cache for decoding: `init_cache(batch, length)` gives {"k", "v"} of shape (layers, batch, length,
  kv_heads, head_dim); `decode(...)` writes the new keys/values at `cache_index` and attends over the
  cache slots `kv_mask` marks valid (and that are not in the future of the query's slot).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn import layer_stack, transformer

Dtype = Any
Cache = dict[str, jax.Array]


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def linear(features: int, axes: tuple[str | None, str | None], std: float, dtype: Dtype, param_dtype: Dtype,
           name: str) -> nn.Dense:
    """A bias-free projection (HF nn.Linear(bias=False), initialised normal(initializer_range))."""
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=_init(std, axes))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, times `weight` (HF LlamaRMSNorm)."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (batch, tokens, head_dim) float32 of the rotary angles position * theta^(-2i/hd), each
    frequency twice (HF `LlamaRotaryEmbedding`, rope_type "default")."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, tokens, heads, head_dim) rotated; cos/sin (batch, tokens, head_dim) cast to x's dtype."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(hd), masked) v with grouped KV heads: q (b, t, heads, hd), k/v (b, s, kv_heads, hd),
    mask (b, t, s) bool (True = attend). Query head j uses KV head j // n_rep (repeat_interleave); the masked
    logits are float32's minimum, so a fully masked (padding) row gives finite values, as HF's."""
    b, t, heads, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, heads // kv_heads, hd)
    logits = jnp.einsum("btgrd,bsgd->bgrts", q, k).astype(jnp.float32) / math.sqrt(hd)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", weights, v).reshape(b, t, heads, hd)


class LlamaAttention(nn.Module):
    """HF `LlamaAttention`: q/k/v/o_proj without bias, RoPE on q and k, grouped KV heads, optional KV cache."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        b, t, width = x.shape
        hd = self.head_dim
        proj = lambda n, axes, name: linear(n, axes, self.init_std, self.dtype, self.param_dtype, name)  # noqa: E731
        q = proj(self.num_heads * hd, ("embed", "heads"), "q_proj")(x).reshape(b, t, self.num_heads, hd)
        k = proj(self.num_kv_heads * hd, ("embed", "heads"), "k_proj")(x).reshape(b, t, self.num_kv_heads, hd)
        v = proj(self.num_kv_heads * hd, ("embed", "heads"), "v_proj")(x).reshape(b, t, self.num_kv_heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:  # write this chunk's keys/values at cache_index, attend over all slots
            k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                                        cache_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                                        cache_index, axis=1)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = grouped_attention(q, k, v, mask).reshape(b, t, self.num_heads * hd)
        return proj(width, ("heads", "embed"), "o_proj")(out), new_cache


class LlamaMlp(nn.Module):
    """SwiGLU (Shazeer 2020, Eq. 6) in HF's layout: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    mlp_dim: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        proj = lambda n, axes, name: linear(n, axes, self.init_std, self.dtype, self.param_dtype, name)  # noqa: E731
        gate = proj(self.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
        up = proj(self.mlp_dim, ("embed", "mlp"), "up_proj")(x)
        return proj(x.shape[-1], ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer (HF `LlamaDecoderLayer`): params input_layernorm, self_attn/{q,k,v,o}_proj,
    post_attention_layernorm, mlp/{gate,up,down}_proj. Called as (h, layer_cache, cos, sin, mask, cache_index)
    -> (h, new layer_cache), the nn.scan shape; `layer_cache` None: no cache (training, full forward)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, layer_cache, cos, sin, mask, cache_index):
        h = nn.with_logical_constraint(h, transformer.TOKENS)
        attention = LlamaAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.init_std, self.dtype,
                                   self.param_dtype, name="self_attn")
        attended, new_cache = attention(RMSNorm(self.rms_norm_eps, self.param_dtype, name="input_layernorm")(h),
                                        layer_cache, cos, sin, mask, cache_index)
        h = h + attended
        mlp = LlamaMlp(self.mlp_dim, self.init_std, self.dtype, self.param_dtype, name="mlp")
        h = h + mlp(RMSNorm(self.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(h))
        return nn.with_logical_constraint(h, transformer.TOKENS), new_cache


class Llama(nn.Module):
    """Llama decoder with its LM head: `apply(variables, input_ids, attention_mask=None)` -> logits (batch,
    tokens, vocab) float32. `embed` / `forward_embeds` let a multimodal model (LLaVA) feed its own token
    embeddings; `decode` runs a chunk (the prompt, or one token) against a KV cache."""

    vocab_size: int = 32000
    width: int = 4096
    depth: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: num_heads (multi-head attention; Llama 2 70B uses 8)
    head_dim: int | None = None  # None: width // num_heads
    mlp_dim: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    scan: bool | str | None = None  # None: auto (>= 12 layers)
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # No gradient reaches the layers' params (a frozen LLM, PathChat's stage 1): with scan and a bfloat16
    # param_dtype the stacked params enter the scan as their raw bits (`frozen_stack_bits`)
    frozen_layers: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def scanned(self) -> bool:
        return layer_stack.resolve_scan(self.scan, self.depth)

    def setup(self):
        if self.num_heads % self.kv_heads:
            raise ValueError(f"medjax/nn/llama.py Llama: num_kv_heads={self.kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        self.embed_tokens = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=_init(self.init_std, ("vocab", "embed")))
        fields = dict(num_heads=self.num_heads, num_kv_heads=self.kv_heads, head_dim=self.hd, mlp_dim=self.mlp_dim,
                      rms_norm_eps=self.rms_norm_eps, init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        policy = layer_stack.resolve_remat(self.remat)
        block = LlamaBlock
        if self.scanned:
            if self.frozen_layers:  # each layer's slice of bits back to its float dtype, inside the scan
                block = nn.map_variables(block, "params", trans_in_fn=_from_bits, trans_out_fn=_to_bits, init=True)
            if policy != "none":
                block = nn.remat(block, policy=layer_stack.REMAT_POLICIES[policy], prevent_cse=False)
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                             length=self.depth, metadata_params={nn.PARTITION_NAME: transformer.LAYERS})
            if self.frozen_layers:  # the stored float stacks -> bits (no gradient) before the scan slices them
                layers = nn.map_variables(layers, "params", trans_in_fn=frozen_stack_bits, trans_out_fn=_from_bits,
                                          init=True)
            self.layers = layers(**fields)
        else:
            if policy != "none":
                block = nn.remat(block, policy=layer_stack.REMAT_POLICIES[policy])
            self.layers = [block(**fields) for _ in range(self.depth)]
        self.norm = RMSNorm(self.rms_norm_eps, self.param_dtype)
        if not self.tie_embeddings:
            self.lm_head = linear(self.vocab_size, ("embed", "vocab"), self.init_std, self.dtype, self.param_dtype,
                                  "lm_head")

    def init_cache(self, batch: int, length: int, dtype: Dtype | None = None) -> Cache:
        """An empty KV cache of `length` slots: {"k", "v"} (layers, batch, length, kv_heads, head_dim)."""
        shape = (self.depth, batch, length, self.kv_heads, self.hd)
        return {"k": jnp.zeros(shape, dtype or self.dtype), "v": jnp.zeros(shape, dtype or self.dtype)}

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def _stack(self, h, cache, cos, sin, mask, cache_index):
        if self.scanned:
            return self.layers(h, cache, cos, sin, mask, cache_index)
        new = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            h, layer_new = layer(h, layer_cache, cos, sin, mask, cache_index)
            new.append(layer_new)
        if cache is None:
            return h, None
        return h, {name: jnp.stack([c[name] for c in new]) for name in ("k", "v")}

    def _head(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        logits = self.embed_tokens.attend(h) if self.tie_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def forward_embeds(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
                       position_ids: jax.Array | None = None) -> jax.Array:
        """Logits for token embeddings (batch, tokens, width), causal, padding from `attention_mask`."""
        b, t = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & (attention_mask[:, None, :] > 0)
        cos, sin = rope_cos_sin(position_ids, self.hd, self.rope_theta)
        h, _ = self._stack(inputs_embeds.astype(self.dtype), None, cos, sin, mask, 0)
        return self._head(h)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 position_ids: jax.Array | None = None) -> jax.Array:
        return self.forward_embeds(self.embed(input_ids), attention_mask, position_ids)

    def decode_embeds(self, inputs_embeds: jax.Array, cache: Cache, cache_index: jax.Array, kv_mask: jax.Array,
                      position_ids: jax.Array) -> tuple[jax.Array, Cache]:
        """A chunk of `t` token embeddings written to cache slots cache_index .. cache_index + t - 1:
        (logits (batch, t, vocab), updated cache). `kv_mask` (batch, cache length): slots holding real tokens
        (the chunk's included); a query attends to valid slots at or before its own."""
        t, length = inputs_embeds.shape[1], cache["k"].shape[2]
        query_slot = cache_index + jnp.arange(t)
        mask = (jnp.arange(length)[None, :] <= query_slot[:, None])[None] & (kv_mask[:, None, :] > 0)
        cos, sin = rope_cos_sin(position_ids, self.hd, self.rope_theta)
        h, cache = self._stack(inputs_embeds.astype(self.dtype), cache, cos, sin, mask, cache_index)
        return self._head(h), cache

    def decode(self, input_ids: jax.Array, cache: Cache, cache_index: jax.Array, kv_mask: jax.Array,
               position_ids: jax.Array) -> tuple[jax.Array, Cache]:
        """`decode_embeds` for token ids."""
        return self.decode_embeds(self.embed(input_ids), cache, cache_index, kv_mask, position_ids)


def _to_bits(tree):
    """bfloat16 leaves as their raw bits (uint16, `lax.bitcast_convert_type`); other leaves unchanged."""
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x, tree)


def _from_bits(tree):
    """uint16 leaves (the bits of `_to_bits`) back to bfloat16; other leaves unchanged."""
    return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x, tree)


def frozen_stack_bits(tree):
    """The frozen (`Llama.frozen_layers`) stacked layer params as the scan reads them: no gradient
    (`stop_gradient`), and bf16 stacks as uint16 bits, turned back into bf16 one layer's slice at a time inside the
    scan. XLA:CPU runs bf16 dots in float32 and converts a bf16 stack the scan slices to float32 whole, hoisted out
    of the loop: 2x the frozen stack in temporaries, per scan (forward and backward; 29 GB for the 7B stage-1
    step). A uint16 slice is not converted; the numbers are the same."""
    return _to_bits(jax.tree.map(jax.lax.stop_gradient, tree))


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1, 0 at padding (HF's left-padding positions: `position_ids.masked_fill_(mask == 0, 1)`
    differs only at padded slots, which no real token attends to)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# Llama 2 paper Table 1 / the released configs: width, layers, heads, FFN.
VARIANTS = {"7B": (4096, 32, 32, 11008), "13B": (5120, 40, 40, 13824), "70B": (8192, 80, 64, 28672)}


def llama_variant(name: str) -> dict:
    """Llama fields of Llama 2 "7B", "13B", "70B" (70B: 8 KV heads)."""
    if name not in VARIANTS:
        raise ValueError(f"medjax/nn/llama.py llama_variant: unknown variant {name!r}; expected one of {list(VARIANTS)}")
    width, depth, heads, mlp_dim = VARIANTS[name]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, num_kv_heads=8 if name == "70B" else None)
