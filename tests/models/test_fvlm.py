"""fVLM model pieces: organ token flags equal torch's max-pool of the organ masks; the organ pooling with
padded, masked keys equals the same attention run on each organ's valid keys alone; the 3D position
embedding from a 2D one; the whole model's embeddings are unit vectors per organ."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from medjax.models.fvlm import FVLM, OrganPooling, VolumeViT, organ_token_flags, pos_embed_from_2d
from medjax.nn.bert import BertEncoder


def test_organ_flags_equal_torch_max_pool():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 5, size=(2, 8, 16, 12)) * (rng.random((2, 8, 16, 12)) < 0.02)
    patch = (4, 8, 4)
    flags = np.asarray(organ_token_flags(jnp.asarray(masks), 4, patch))
    for organ in range(4):
        one = torch.from_numpy((masks == organ + 1).astype(np.float32))[:, None]
        pooled = F.max_pool3d(one, kernel_size=patch, stride=patch).flatten(1) > 0
        np.testing.assert_array_equal(flags[:, organ], pooled.numpy())
    assert 0 < flags.sum() < flags.size  # sparse masks: some tokens in, some out


def test_padded_masked_keys_equal_attention_on_the_valid_keys():
    rng = np.random.default_rng(1)
    layers, batch, tokens, width, organs = 2, 2, 6, 16, 3
    keys = jnp.asarray(rng.normal(size=(layers, batch, tokens, width)), jnp.float32)
    flags = rng.random((batch, organs, tokens)) < 0.5
    flags[:, :, 0] = True  # every organ owns at least one token
    pooling = OrganPooling(num_organs=organs, num_heads=4, embed_dim=5)
    params = jax.jit(pooling.init)(jax.random.key(0), keys, jnp.asarray(flags))["params"]
    params = jax.tree.map(lambda x: x, nn.unbox(params))
    params["query_tokens"] = jnp.asarray(rng.normal(size=(organs, width)), jnp.float32)  # not the zero init
    out = np.asarray(jax.jit(pooling.apply)({"params": params}, keys, jnp.asarray(flags)))
    p = jax.tree.map(np.asarray, params["attention"])
    proj = lambda x, name: np.einsum("tw,whd->thd", x, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
    for b in range(batch):
        for o in range(organs):
            valid = np.concatenate([np.asarray(keys[l, b])[flags[b, o]] for l in range(layers)])  # the organ's tokens
            q = proj(np.asarray(params["query_tokens"][o])[None], "query")  # (1, heads, head_dim)
            k, v = proj(valid, "key"), proj(valid, "value")
            logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            pooled = np.einsum("hqk,khd->qhd", weights, v)
            pooled = np.einsum("qhd,hdw->qw", pooled, p["out"]["kernel"])[0] + p["out"]["bias"]
            expected = pooled @ np.asarray(params["proj_kernel"][o]) + np.asarray(params["proj_bias"][o])
            np.testing.assert_allclose(out[b, o], expected, rtol=1e-4, atol=1e-5)


def test_pos_embed_from_2d_repeats_in_depth():
    pos = np.random.default_rng(2).normal(size=(1, 1 + 4 * 4, 8)).astype(np.float32)
    out = pos_embed_from_2d(pos, (4, 4), (3, 4, 4))
    assert out.shape == (1, 48, 8)
    np.testing.assert_allclose(out[0, :16], pos[0, 1:], atol=1e-5)  # same grid: no resize
    np.testing.assert_array_equal(out[0, :16], out[0, 32:])


def test_fvlm_embeddings_unit_norm_and_organ_specific():
    vision = VolumeViT(volume_shape=(8, 16, 16), patch=(4, 8, 8), width=32, depth=2, num_heads=4, mlp_dim=64,
                       key_blocks=(0,))
    text = BertEncoder(vocab_size=50, width=32, depth=1, num_heads=4, mlp_dim=64, max_positions=16,
                       add_pooling_layer=False)
    model = FVLM(vision, text, num_organs=4, embed_dim=8)
    rng = np.random.default_rng(3)
    volumes = jnp.asarray(rng.random((2, 8, 16, 16, 1)), jnp.float32)
    masks = jnp.asarray(rng.integers(0, 5, (2, 8, 16, 16)), jnp.int32)
    ids = jnp.asarray(rng.integers(0, 50, (2, 4, 6)), jnp.int32)
    att = jnp.ones((2, 4, 6), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), volumes, masks, ids, att)["params"]
    image, txt, temp = jax.jit(model.apply)({"params": params}, volumes, masks, ids, att)
    assert image.shape == (2, 4, 8) and txt.shape == (2, 4, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(temp), 0.07, rtol=1e-6)
    assert np.abs(np.asarray(image[:, 0]) - np.asarray(image[:, 1])).max() > 1e-3  # per-organ projections differ
