"""relation_mask_attention_reference (MRM Sec. 3.2.1) against a direct numpy triple loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.kernels.relation_mask import relation_mask_attention_reference


def numpy_relation_mask(q, k, v, ratio):
    """Per batch, head and query row: softmax, sort, k-th largest, mask entries >= it, dot V."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_tokens, heads, dim = q.shape
    kv_tokens = k.shape[1]
    top = math.floor(ratio * kv_tokens)
    out = np.zeros((batch, q_tokens, heads, dim))
    for b in range(batch):
        for h in range(heads):
            for p in range(q_tokens):
                logits = np.array([q[b, p, h] @ k[b, j, h] for j in range(kv_tokens)]) / math.sqrt(dim)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                if top > 0:
                    kth_largest = np.sort(probs)[::-1][top - 1]
                    probs = np.where(probs >= kth_largest, 0.0, probs)
                out[b, p, h] = probs @ v[b, :, h]
    return out


def random_qkv(seed, batch, q_tokens, kv_tokens, heads, dim):
    rs = np.random.default_rng(seed)
    q = rs.normal(size=(batch, q_tokens, heads, dim)).astype(np.float32)
    k = rs.normal(size=(batch, kv_tokens, heads, dim)).astype(np.float32)
    v = rs.normal(size=(batch, kv_tokens, heads, dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("q_tokens,kv_tokens,heads,ratio", [
    (5, 5, 1, 0.4),   # self-attention shape, one head
    (4, 7, 3, 0.3),   # cross-attention: q and kv lengths differ, several heads
    (7, 3, 2, 0.5),   # more queries than keys
    (3, 6, 2, 5 / 6),  # k = kv_tokens - 1: only the smallest relation survives
    (4, 6, 2, 0.0),   # ratio 0: plain attention
])
def test_reference_matches_numpy_loop(q_tokens, kv_tokens, heads, ratio):
    q, k, v = random_qkv(0, 2, q_tokens, kv_tokens, heads, 4)
    got = relation_mask_attention_reference(q, k, v, ratio=ratio)
    np.testing.assert_allclose(np.asarray(got), numpy_relation_mask(q, k, v, ratio), rtol=1e-5, atol=1e-5)


def test_ratio_zero_is_plain_attention():
    q, k, v = random_qkv(1, 2, 5, 6, 2, 8)
    got = relation_mask_attention_reference(q, k, v, ratio=0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.dot_product_attention(q, k, v)), rtol=1e-5, atol=1e-6)


def test_k_minus_one_keeps_only_the_smallest_relation():
    q, k, v = random_qkv(2, 1, 3, 4, 1, 4)
    got = np.asarray(relation_mask_attention_reference(q, k, v, ratio=0.75))  # k = 3 of 4
    logits = np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 2.0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    smallest = probs.argmin(-1)
    expected = probs[np.arange(3), smallest][:, None] * v[0, smallest, 0]
    np.testing.assert_allclose(got[0, :, 0], expected, rtol=1e-5, atol=1e-6)


def test_ties_with_the_kth_largest_are_masked_too():
    q, k, v = random_qkv(3, 1, 2, 5, 1, 4)
    k[0, 1] = k[0, 0] = 3.0 * q[0, 0]  # keys 0 and 1 tie as row 0's largest relation
    got = np.asarray(relation_mask_attention_reference(q, k, v, ratio=0.2))  # k = 1
    np.testing.assert_allclose(got, numpy_relation_mask(q, k, v, 0.2), rtol=1e-5, atol=1e-6)
    logits = k[0, :, 0] @ q[0, 0, 0] / 2.0
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected_row0 = probs[2:] @ v[0, 2:, 0]  # both tied keys dropped, no renormalisation
    np.testing.assert_allclose(got[0, 0, 0], expected_row0, rtol=1e-5, atol=1e-6)


def test_all_tied_row_is_masked_entirely():
    _, k, v = random_qkv(4, 1, 3, 4, 2, 4)
    q = np.zeros((1, 3, 2, 4), np.float32)  # uniform relations: every entry ties with the k-th largest
    got = np.asarray(relation_mask_attention_reference(q, k, v, ratio=0.5))
    np.testing.assert_array_equal(got, np.zeros_like(got))


def test_gradient_matches_fixed_mask_rederivation():
    q, k, v = random_qkv(5, 2, 4, 6, 2, 4)
    weights = np.random.default_rng(6).normal(size=(2, 4, 2, 4)).astype(np.float32)
    ratio = 0.5

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    probs = jax.nn.softmax(logits, axis=-1)
    kth_largest = jnp.sort(probs, axis=-1)[..., -3][..., None]  # k = floor(0.5 * 6) = 3
    keep = probs < kth_largest  # fixed mask: the top-k selection is piecewise constant

    def fixed_mask_objective(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
        return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p, 0.0), v) * weights)

    def reference_objective(q, k, v):
        return jnp.sum(relation_mask_attention_reference(q, k, v, ratio=ratio) * weights)

    got = jax.grad(reference_objective, argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(fixed_mask_objective, argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, expected):
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.abs(np.asarray(g)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)
