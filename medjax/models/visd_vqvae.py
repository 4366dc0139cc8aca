"""ViSD-Boost's anatomy normality model (Cao et al., "Boosting Vision Semantic Density with Anatomy Normality
Modeling for Medical Vision-language Pre-training", ICCV 2025, Sec. 3.3; alibaba-damo-academy/ViSD-Boost
`VISDBOOST.forward_test_win`, `lavis/utils/vit_vae.py`): a per-anatomy VQ-VAE in the latent space of the
backbone's stage-4 organ tokens.

Per sample and organ o, over the organ's stage-4 tokens x (n, C):
    lo = min(x), hi = max(x - lo)                       (one scalar each, over tokens and channels)
    s  = (x - lo) / hi - 0.5                            (to [-0.5, 0.5])
    z  = Encoder([Linear 1->C (o) ; s])[1:]             (organ-id token prepended, dropped after the encoder)
    e  = VQ(z)                                          (EMA codebook over all organs' codes: medjax.nn.vq)
    r  = Decoder(e)
    recon = (r + 0.5) hi + lo                           (back to the token scale)
Encoder: Linear C -> 2C -> dim, then `depth` pre-LN transformer layers (`vae_layer`: the shared
`medjax.nn.transformer.TransformerBlock` with heads x head_dim attention, qkv without bias, MLP with exact GELU,
dropout 0.1, no position embedding) and a final LayerNorm; the decoder mirrors it
(transformer, Linear dim -> 2C -> C). Paper sizes: C 256, dim 768, 2 layers, 16 heads x 64, MLP 2048,
codebook 4 x 100 codes.

Static shapes: every organ's token sequence is the whole stage-4 grid with the organ's tokens `valid`; the
attention masks the other keys, the min/max and losses skip them, so valid outputs equal the original's
computation on the organ's tokens alone.
Training objective (the training code was not released; the standard VQ-VAE objective the model's own
`data_variance=0.5` argument belongs to): mean((r - s)^2) / data_variance + 0.25 commitment, over the valid
tokens of the organs with weight 1 (normal organs, the paper).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.transformer import TransformerBlock, dense, layer_norm
from medjax.nn.vq import VectorQuantizerEMA

Dtype = Any
_WHERE = "medjax/models/visd_vqvae.py"


def vae_layer(num_heads: int = 16, head_dim: int = 64, mlp_dim: int = 2048, dropout: float = 0.1,
              dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> TransformerBlock:
    """x + Attention(LN(x)), then x + FF(LN(x)) (vit-pytorch `Transformer` layer, as the original) on the shared
    block: `num_heads` x `head_dim` attention (not width / heads), q/k/v without bias, the output projection with
    one, dropout on the attention probabilities, the MLP's hidden activations and both branches, exact GELU,
    LayerNorm eps 1e-5 (torch's), zero biases. Params: attn_norm, attn/{query, key, value, out}, ff_norm,
    ff/{fc1, fc2}."""
    return TransformerBlock(num_heads, head_dim=head_dim, mlp_dim=mlp_dim, qkv_bias=False, attention_dropout=dropout,
                            hidden_dropout=dropout, mlp_dropout=dropout, layer_norm_eps=1e-5, mlp_bias_std=0.0,
                            fused_attention=False, norm_names=("attn_norm", "ff_norm", "kv_norm"), mlp_name="ff",
                            attention_name="attn", dtype=dtype, param_dtype=param_dtype, name=name)


class VAETransformer(nn.Module):
    """`depth` `vae_layer`s over (batch, n, width) with a key mask (batch, 1, 1, n), then a LayerNorm."""

    depth: int = 2
    num_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        for i in range(self.depth):
            x = vae_layer(self.num_heads, self.head_dim, self.mlp_dim, self.dropout, self.dtype, self.param_dtype,
                          name=f"layers_{i}")(x, mask=mask, train=train)
        return layer_norm(self.dtype, self.param_dtype, "norm", eps=1e-5)(x)


def minmax_scale(tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scaled to [-0.5, 0.5], lo, hi) per leading index; tokens (..., n, C), valid (..., n). Invalid tokens are 0
    in the output; an organ without tokens (or of constant value) gets lo 0 / hi 1."""
    x = tokens.astype(jnp.float32)
    v = valid[..., None]
    lo = jnp.min(jnp.where(v, x, jnp.inf), axis=(-2, -1))
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.max(jnp.where(v, x - lo[..., None, None], -jnp.inf), axis=(-2, -1))
    hi = jnp.where(hi > 0, hi, 1.0)
    scaled = jnp.where(v, (x - lo[..., None, None]) / hi[..., None, None] - 0.5, 0.0)
    return scaled, lo, hi


class NormalityVQVAE(nn.Module):
    """tokens (batch, organs, n, C), valid (batch, organs, n) -> (recon (batch, organs, n, C) in the tokens'
    scale, {"reconstruction", "commitment"} losses over the organs with `weights` (batch, organs) = 1)."""

    num_organs: int = 4
    dim: int = 768
    depth: int = 2
    num_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    codes_per_organ: int = 100
    decay: float = 0.99
    epsilon: float = 1e-5
    commitment_cost: float = 0.25
    data_variance: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, valid: jax.Array, weights: jax.Array | None = None, *, train: bool = False,
                 update: bool = False) -> tuple[jax.Array, dict]:
        if tokens.ndim != 4 or tokens.shape[1] != self.num_organs or valid.shape != tokens.shape[:3]:
            raise ValueError(f"{_WHERE} NormalityVQVAE: tokens (batch, {self.num_organs} organs, n, C) and valid "
                             f"(batch, organs, n) expected, got {tokens.shape} and {valid.shape}")
        b, o, n, c = tokens.shape
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = dict(depth=self.depth, num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                      dropout=self.dropout, **kinds)
        scaled, lo, hi = minmax_scale(tokens, valid)
        organ_id = jnp.broadcast_to(jnp.arange(o, dtype=jnp.float32)[None, :, None, None], (b, o, 1, 1))
        id_token = dense(c, (None, "embed"), self.dtype, self.param_dtype, "id_projs")(organ_id)
        sequence = jnp.concatenate([id_token, scaled.astype(self.dtype)], axis=2).reshape(b * o, n + 1, c)
        keys = jnp.concatenate([jnp.ones((b, o, 1), bool), valid], axis=2).reshape(b * o, 1, 1, n + 1)
        z = dense(2 * c, ("embed", "mlp"), self.dtype, self.param_dtype, "encoder_input1")(sequence)
        z = dense(self.dim, ("mlp", "embed"), self.dtype, self.param_dtype, "encoder_input2")(z)
        z = VAETransformer(name="encoder", **layers)(z, keys, train=train)[:, 1:]  # the id token removed
        token_weights = valid.reshape(b * o, n)
        if weights is not None:
            token_weights = token_weights & weights.reshape(b * o, 1).astype(bool)
        quantizer = VectorQuantizerEMA(self.num_organs * self.codes_per_organ, self.dim, self.decay, self.epsilon,
                                       self.commitment_cost, name="vq_layer")
        e, _, commitment = quantizer(z, token_weights, update=update, straight_through=train)
        r = VAETransformer(name="decoder", **layers)(e, keys[..., 1:], train=train)
        r = dense(2 * c, ("embed", "mlp"), self.dtype, self.param_dtype, "decoder_output1")(r)
        r = dense(c, ("mlp", "embed"), self.dtype, self.param_dtype, "decoder_output2")(r).reshape(b, o, n, c)
        error = jnp.square(r.astype(jnp.float32) - scaled).mean(-1)
        w = token_weights.reshape(b, o, n).astype(jnp.float32)
        reconstruction = jnp.sum(error * w) / jnp.maximum(w.sum(), 1.0) / self.data_variance
        recon = (r.astype(jnp.float32) + 0.5) * hi[..., None, None] + lo[..., None, None]
        return recon.astype(self.dtype), {"reconstruction": reconstruction, "commitment": commitment}
