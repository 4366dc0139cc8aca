"""ViSD-Boost (Cao et al., "Boosting Vision Semantic Density with Anatomy Normality Modeling for Medical
Vision-language Pre-training", ICCV 2025; alibaba-damo-academy/ViSD-Boost `lavis/utils/vit.py`, `model.py`):
fVLM's organ-level CT-report alignment (medjax.models.fvlm) on a CNN backbone with normality-boosted tokens.

- Backbone: MedicalNet ResNet-18 3D, shortcut A (medjax.nn.resnet3d); each stage map -> 1x1x1 conv (`proj1..4`,
  64/128/256/512 -> 256) -> tokens (D, H, W)-major. Stage s of a 112 x 256 x 352 crop: 56x64x88, 28x32x44,
  14x16x22, 7x8x11 tokens.
- Organ flags per stage (`stage_token_flags`): max-pool of the organ masks with kernel = stride = (2, 4, 4),
  (4, 8, 8), (8, 16, 16), (16, 32, 32) (medjax.models.fvlm.organ_token_flags).
- Normality (`NormalityVQVAE`, medjax.models.visd_vqvae): the organ's stage-4 tokens reconstructed by the
  per-anatomy VQ-VAE trained on normal organs.
- Hybrid feature fusion + query pooling (`FusedOrganPooling`), per organ o over its tokens of all stages:
      original = [stage 1..3 tokens ; stage-4 tokens],  vae = [stage 1..3 tokens ; stage-4 reconstruction]
      h = res_projs2_o(res_projs1_o([original, vae]))              Linear 512 -> 256 -> 256, no activation
      v = vision_projs_o(MHA(query_o, h, h))                        one shared 4-head attention, 256 -> embed
  Both projections and the attention's key/value maps are linear, so the attention is computed FOLDED:
  logits and value sums are taken on the 256-d tokens with the organ's composed maps, never materialising h
  per organ for the tens of thousands of stage-1 tokens (exactly equal, up to float rounding, to attending
  over h: tests/test_train_visd.py). Padded, masked keys: every organ attends over all tokens with the other
  tokens masked (static shapes), which equals the original's loop over each organ's own tokens.
  Without the normality model (`use_vq=False`, the vision-semantic-enhancement stage) vae = original.
- Text: the fVLM text tower ([CLS] -> Linear -> L2 norm); a learnable temperature divisor (init 0.07).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.fvlm import l2_normalize, organ_token_flags
from medjax.models.visd_vqvae import NormalityVQVAE
from medjax.nn.resnet3d import ResNet3D
from medjax.nn.transformer import HeadsDense, dense

Dtype = Any
_WHERE = "medjax/models/visd.py"
STAGE_POOL = ((2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32))  # token size of stage s in voxels (D, H, W)


def stage_token_flags(masks: jax.Array, num_organs: int) -> list[jax.Array]:
    """(batch, D, H, W) organ labels -> per stage (batch, organs, tokens_s) bool (the original's max-pools)."""
    return [organ_token_flags(masks, num_organs, kernel) for kernel in STAGE_POOL]


def _organ_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, init) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


class FusedOrganPooling(nn.Module):
    """Hybrid feature fusion + query pooling (module docstring), folded. tokens (batch, N, C): every stage's
    tokens concatenated, stage 4 last (`stage4` of them); recon (batch, organs, stage4, C) or None (vae =
    original); flags (batch, organs, N) -> (batch, organs, embed_dim), not normalised."""

    num_organs: int = 4
    num_heads: int = 4
    embed_dim: int = 256
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, recon: jax.Array | None, flags: jax.Array, stage4: int, *,
                 train: bool = False) -> jax.Array:
        b, n, c = tokens.shape
        o, heads = self.num_organs, self.num_heads
        if flags.shape != (b, o, n) or (recon is not None and recon.shape != (b, o, stage4, c)):
            raise ValueError(f"{_WHERE} FusedOrganPooling: flags (batch, organs, tokens) = {(b, o, n)} and recon "
                             f"{(b, o, stage4, c)} expected, got {flags.shape} and "
                             f"{None if recon is None else recon.shape}")
        if c % heads:
            raise ValueError(f"{_WHERE} FusedOrganPooling: num_heads={heads} must divide the token width {c}")
        d = c // heads
        lecun, zeros = nn.initializers.lecun_normal(batch_axis=(0,)), nn.initializers.zeros_init()
        w1 = _organ_param(self, "res_projs1_kernel", (o, 2 * c, c), (None, None, "embed"), lecun)
        b1 = _organ_param(self, "res_projs1_bias", (o, c), (None, "embed"), zeros)
        w2 = _organ_param(self, "res_projs2_kernel", (o, c, c), (None, "embed", None), lecun)
        b2 = _organ_param(self, "res_projs2_bias", (o, c), (None, None), zeros)
        query = _organ_param(self, "query_tokens", (o, c), (None, "embed"), zeros)
        glorot = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        in_proj = {name: (f32(_organ_param(self, f"attn_{name}_kernel", (c, heads, d), ("embed", "heads", "kv"), glorot)),
                          f32(_organ_param(self, f"attn_{name}_bias", (heads, d), ("heads", "kv"), zeros)))
                   for name in ("query", "key", "value")}
        hp = dict(precision=jax.lax.Precision.HIGHEST)
        # the organ's composed linear map of [original, vae] -> h: h = x A_o + y B_o + const_o
        a_map = jnp.einsum("oij,ojk->oik", f32(w1[:, :c]), f32(w2), **hp)
        b_map = jnp.einsum("oij,ojk->oik", f32(w1[:, c:]), f32(w2), **hp)
        const = jnp.einsum("oj,ojk->ok", f32(b1), f32(w2), **hp) + f32(b2)
        q = (jnp.einsum("oc,chd->ohd", f32(query), in_proj["query"][0], **hp) + in_proj["query"][1]) * d ** -0.5
        key_kernel, (value_kernel, value_bias) = in_proj["key"][0], in_proj["value"]
        # logits_{o,h}(t) = x(t) . uA_{o,h} + y_o(t) . uB_{o,h} (+ a constant per (o, h), cancelled by the softmax)
        u_a = jnp.einsum("oik,khd,ohd->ohi", a_map, key_kernel, q, **hp)
        u_b = jnp.einsum("oik,khd,ohd->ohi", b_map, key_kernel, q, **hp)
        x = f32(tokens)
        if recon is None:
            logits = jnp.einsum("bni,ohi->bohn", x, u_a + u_b, **hp)
        else:
            shared = jnp.einsum("bni,ohi->bohn", x[:, :n - stage4], u_a + u_b, **hp)
            own = (jnp.einsum("bni,ohi->bohn", x[:, n - stage4:], u_a, **hp)
                   + jnp.einsum("boni,ohi->bohn", f32(recon), u_b, **hp))
            logits = jnp.concatenate([shared, own], axis=-1)
        weights = jax.nn.softmax(jnp.where(flags[:, :, None], logits, jnp.finfo(jnp.float32).min), axis=-1)
        weights = nn.Dropout(self.dropout)(weights, deterministic=not train)  # MHA's dropout on the attention
        sum_x = jnp.einsum("bohn,bni->bohi", weights, x, **hp)
        sum_y = sum_x
        if recon is not None:
            w4 = weights[..., n - stage4:]
            sum_y = sum_x - jnp.einsum("bohn,bni->bohi", w4, x[:, n - stage4:], **hp) + jnp.einsum(
                "bohn,boni->bohi", w4, f32(recon), **hp)
        total = weights.sum(-1)  # 1 without dropout
        pooled = (jnp.einsum("bohi,oik,khd->bohd", sum_x, a_map, value_kernel, **hp)
                  + jnp.einsum("bohi,oik,khd->bohd", sum_y, b_map, value_kernel, **hp)
                  + total[..., None] * (jnp.einsum("ok,khd->ohd", const, value_kernel, **hp) + value_bias)[None])
        pooled = HeadsDense((c,), ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="attn_out")(pooled.astype(self.dtype))
        kernel = _organ_param(self, "vision_projs_kernel", (o, c, self.embed_dim), (None, "embed", None), lecun)
        bias = _organ_param(self, "vision_projs_bias", (o, self.embed_dim), (None, None), zeros)
        return jnp.einsum("boc,oce->boe", pooled, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class ViSDVision(nn.Module):
    """Backbone, stage projections, normality VQ-VAE and fused organ pooling (module docstring)."""

    num_organs: int = 4
    depth: int = 18
    width: int = 64
    shortcut_type: str = "A"
    detach_shortcut: bool = False
    token_dim: int = 256
    pool_heads: int = 4
    embed_dim: int = 256
    dropout: float = 0.1
    vq: dict | None = None  # NormalityVQVAE fields
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.res_model = ResNet3D(self.depth, self.width, self.shortcut_type, self.detach_shortcut, **kinds)
        self.projs = [dense(self.token_dim, ("channels", "embed"), self.dtype, self.param_dtype, f"proj{s + 1}")
                      for s in range(4)]
        self.vqvae = NormalityVQVAE(self.num_organs, **dict(self.vq or {}), **kinds)
        self.pooling = FusedOrganPooling(self.num_organs, self.pool_heads, self.embed_dim, self.dropout, **kinds)

    def stage_tokens(self, volumes: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """(batch, D, H, W, 1) -> per stage (batch, tokens_s, token_dim)."""
        for size, step in zip(volumes.shape[1:4], STAGE_POOL[-1]):
            if volumes.ndim != 5 or size % step:
                raise ValueError(f"{_WHERE} ViSDVision: volumes (batch, D, H, W, 1) with D, H, W multiples of "
                                 f"{STAGE_POOL[-1]} (the stage-4 token size) expected, got {volumes.shape}")
        maps = self.res_model(volumes, train=train)
        return [proj(m).reshape(m.shape[0], -1, self.token_dim) for proj, m in zip(self.projs, maps)]

    def normality(self, stage4: jax.Array, flags4: jax.Array, weights: jax.Array | None = None, *, train: bool = False,
                  update: bool = False) -> tuple[jax.Array, dict]:
        """stage-4 tokens (batch, n, C), flags (batch, organs, n) -> (recon (batch, organs, n, C), losses)."""
        tokens = jnp.broadcast_to(stage4[:, None], (stage4.shape[0], self.num_organs) + stage4.shape[1:])
        return self.vqvae(tokens, flags4, weights, train=train, update=update)

    def __call__(self, volumes: jax.Array, masks: jax.Array, *, use_vq: bool = True, train: bool = False) -> jax.Array:
        """Organ embeddings (batch, organs, embed_dim), L2-normalised. The VQ-VAE runs deterministic and
        without a straight-through gradient (frozen normality model)."""
        stages = self.stage_tokens(volumes, train=train)
        flags = stage_token_flags(masks, self.num_organs)
        recon = None
        if use_vq:
            recon, _ = self.normality(stages[-1], flags[-1])
            recon = recon.astype(stages[-1].dtype)
        tokens = jnp.concatenate(stages, axis=1)
        pooled = self.pooling(tokens, recon, jnp.concatenate(flags, axis=-1), stages[-1].shape[1], train=train)
        return l2_normalize(pooled)


class ViSD(nn.Module):
    """ViSD-Boost: `vision` (ViSDVision) + a text tower. `image_embeddings`, `text_embeddings` (batch, organs,
    E), L2-normed, as medjax.models.fvlm.FVLM; `vq_losses` for the normality stage."""

    vision: nn.Module
    text: nn.Module
    embed_dim: int = 256
    init_temperature: float = 0.07
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_proj = dense(self.embed_dim, ("embed", None), self.dtype, jnp.float32, "text_proj")
        self.temp = self.param("temp", nn.with_logical_partitioning(
            nn.initializers.constant(self.init_temperature), ()), (), jnp.float32)

    def image_embeddings(self, volumes, masks, *, use_vq: bool = True, train: bool = False):
        return self.vision(volumes, masks, use_vq=use_vq, train=train)

    def text_embeddings(self, input_ids, attention_mask, *, train: bool = False):
        b, o, t = input_ids.shape
        hidden = self.text(input_ids.reshape(b * o, t), attention_mask.reshape(b * o, t), train=train)
        return l2_normalize(self.text_proj(hidden[:, 0])).reshape(b, o, -1)

    def vq_losses(self, volumes, masks, weights, *, train: bool = True):
        """The normality stage: the frozen backbone's stage-4 tokens (running BN statistics, no gradient)
        through the VQ-VAE, codebook updated by EMA; weights (batch, organs): the organs it learns from."""
        stage4 = jax.lax.stop_gradient(self.vision.stage_tokens(volumes, train=False)[-1])
        flags4 = stage_token_flags(masks, self.vision.num_organs)[-1]
        _, losses = self.vision.normality(stage4, flags4, weights, train=train, update=train)
        return losses

    def temperature(self):
        return self.temp

    def __call__(self, volumes, masks, input_ids, attention_mask, *, train: bool = False):
        """Every param is created here (init): the image embeddings run the VQ-VAE too."""
        return (self.image_embeddings(volumes, masks, train=train), self.text_embeddings(input_ids, attention_mask,
                                                                                          train=train), self.temp)
