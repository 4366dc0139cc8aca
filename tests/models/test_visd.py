"""ViSD-Boost model pieces: per-stage organ flags equal torch's max-pools; the folded hybrid-feature query
pooling equals materialising the hybrid features and attending over each organ's own tokens; the padded,
masked VQ-VAE gives on an organ's tokens what it gives on those tokens alone."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from medjax.models.visd import STAGE_POOL, FusedOrganPooling, stage_token_flags
from medjax.models.visd_vqvae import NormalityVQVAE


def test_stage_flags_equal_torch_max_pool():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, size=(2, 16, 32, 64)) * (rng.random((2, 16, 32, 64)) < 0.01)
    flags = stage_token_flags(jnp.asarray(masks), 4)
    for stage, kernel in enumerate(STAGE_POOL):
        for organ in range(4):
            one = torch.from_numpy((masks == organ + 1).astype(np.float32))[:, None]
            pooled = F.max_pool3d(one, kernel_size=kernel, stride=kernel).flatten(1) > 0
            np.testing.assert_array_equal(np.asarray(flags[stage][:, organ]), pooled.numpy())


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_fused_pooling_equals_attention_over_each_organs_hybrid_tokens():
    rng = np.random.default_rng(1)
    b, o, c, heads, e, n_shared, n4 = 2, 3, 8, 2, 5, 7, 3
    n = n_shared + n4
    tokens = rng.normal(size=(b, n, c)).astype(np.float32)
    recon = rng.normal(size=(b, o, n4, c)).astype(np.float32)
    flags = rng.random((b, o, n)) < 0.6
    flags[:, :, 0] = flags[:, :, -1] = True
    pooling = FusedOrganPooling(num_organs=o, num_heads=heads, embed_dim=e)
    params = nn.unbox(jax.jit(pooling.init, static_argnums=4)(jax.random.key(0), tokens, recon, flags, n4)["params"])
    params = {k: (rng.normal(size=np.shape(v)).astype(np.float32) * 0.3 if not isinstance(v, dict) else
                  {kk: rng.normal(size=np.shape(vv)).astype(np.float32) * 0.3 for kk, vv in v.items()})
              for k, v in params.items()}  # no zero-initialised queries or biases
    apply = jax.jit(pooling.apply, static_argnums=4)
    for with_recon in (True, False):
        out = np.asarray(apply({"params": params}, tokens, recon if with_recon else None, flags, n4))
        p = params
        d = c // heads
        for i in range(b):
            for k in range(o):
                vae = tokens[i].copy()
                if with_recon:
                    vae[n_shared:] = recon[i, k]
                keep = flags[i, k]
                hybrid = np.concatenate([tokens[i][keep], vae[keep]], -1)  # [original, vae] on the organ's tokens
                h = (hybrid @ p["res_projs1_kernel"][k] + p["res_projs1_bias"][k]) @ p["res_projs2_kernel"][k] + \
                    p["res_projs2_bias"][k]
                q = np.einsum("c,chd->hd", p["query_tokens"][k], p["attn_query_kernel"]) + p["attn_query_bias"]
                key = np.einsum("tc,chd->thd", h, p["attn_key_kernel"]) + p["attn_key_bias"]
                value = np.einsum("tc,chd->thd", h, p["attn_value_kernel"]) + p["attn_value_bias"]
                weights = _softmax(np.einsum("hd,thd->ht", q, key) / np.sqrt(d))
                pooled = np.einsum("ht,thd->hd", weights, value)
                pooled = np.einsum("hd,hdc->c", pooled, p["attn_out"]["kernel"]) + p["attn_out"]["bias"]
                want = pooled @ p["vision_projs_kernel"][k] + p["vision_projs_bias"][k]
                np.testing.assert_allclose(out[i, k], want, rtol=2e-4, atol=2e-4)


def test_padded_vqvae_equals_the_organs_tokens_alone():
    rng = np.random.default_rng(2)
    vqvae = NormalityVQVAE(num_organs=2, dim=16, depth=1, num_heads=2, head_dim=8, mlp_dim=32, dropout=0.0,
                           codes_per_organ=3)
    n, c = 6, 8
    tokens = rng.normal(size=(1, 2, n, c)).astype(np.float32)
    valid = np.asarray([[[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]]], bool)  # 3 each: one compile alone
    variables = jax.jit(vqvae.init)(jax.random.key(0), tokens, valid)
    recon, losses = jax.jit(vqvae.apply)(variables, tokens, valid)
    recon = np.asarray(recon)
    for organ in range(2):  # each organ alone: its valid tokens only, every one valid (organ id from its slot)
        keep = valid[0, organ]
        alone = np.zeros((1, 2, keep.sum(), c), np.float32)
        alone[0, organ] = tokens[0, organ, keep]
        mask = np.zeros((1, 2, keep.sum()), bool)
        mask[0, organ] = True
        got, _ = jax.jit(vqvae.apply)(variables, alone, mask)
        np.testing.assert_allclose(recon[0, organ, keep], np.asarray(got)[0, organ], rtol=1e-4, atol=1e-5)
        # min-max scaling: the reconstruction lives on the organ's token scale
        assert np.isfinite(recon[0, organ, keep]).all()
    assert np.isfinite(float(losses["reconstruction"])) and float(losses["commitment"]) >= 0
