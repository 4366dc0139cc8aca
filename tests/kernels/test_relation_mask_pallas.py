"""The Pallas relation-masking kernel (interpret mode on CPU) against its jnp reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.kernels.relation_mask import (
    RelationMaskBlockSizes,
    masked_count,
    relation_mask_attention,
    relation_mask_attention_pallas,
    relation_mask_attention_reference,
)


def _inputs(batch, q_tokens, kv_tokens, heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_tokens, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_tokens, heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_tokens, heads, head_dim), dtype)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, cotangent


def _output_and_grads(fn, q, k, v, cotangent):
    """fn(q, k, v) and the gradients of sum(fn * cotangent) w.r.t. q, k, v, in one jitted program."""
    def run(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(cotangent.astype(out.dtype))
    return jax.jit(run)(q, k, v)


def _compare(q, k, v, cotangent, ratio, block_sizes, atol):
    ref_out, ref_grads = _output_and_grads(
        lambda q, k, v: relation_mask_attention_reference(q, k, v, ratio=ratio), q, k, v, cotangent)
    out, grads = _output_and_grads(
        lambda q, k, v: relation_mask_attention(q, k, v, ratio=ratio, impl="pallas", block_sizes=block_sizes),
        q, k, v, cotangent)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=0)
    for name, g, ref_g, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref_g, np.float32), atol=atol, rtol=0,
                                   err_msg=f"d{name}")
    return ref_out


@pytest.mark.parametrize(
    "batch, q_tokens, kv_tokens, heads, ratio, blocks",
    [
        # self-attention, sizes not divisible by the blocks, many heads, 1-bit search
        (2, 37, 37, 3, 0.5, RelationMaskBlockSizes(block_q=16, block_kv=8, search_bits=1)),
        # cross attention (q_tokens != kv_tokens), one head, 3-bit search
        (1, 21, 45, 1, 0.25, RelationMaskBlockSizes(block_q=8, block_kv=16, search_bits=3)),
    ],
)
def test_matches_reference_forward_and_gradients(batch, q_tokens, kv_tokens, heads, ratio, blocks):
    q, k, v, cotangent = _inputs(batch, q_tokens, kv_tokens, heads, 8)
    _compare(q, k, v, cotangent, ratio, blocks, atol=2e-5)


def test_ratio_zero_is_plain_softmax_attention():
    q, k, v, cotangent = _inputs(1, 19, 19, 2, 8, seed=1)
    ref_out = _compare(q, k, v, cotangent, 0.0, RelationMaskBlockSizes(block_q=8, block_kv=8), atol=2e-5)
    plain = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(ref_out, plain, atol=1e-5)


def test_k_equal_to_kv_tokens_minus_one_keeps_only_the_smallest_relation():
    kv_tokens = 13
    ratio = 0.93
    assert masked_count(ratio, kv_tokens) == kv_tokens - 1
    q, k, v, cotangent = _inputs(1, 11, kv_tokens, 2, 8, seed=2)
    ref_out = _compare(q, k, v, cotangent, ratio, RelationMaskBlockSizes(block_q=8, block_kv=8), atol=2e-5)
    # Only the least related key survives in each row: out = p_min * v[argmin].
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
    probs = jax.nn.softmax(logits, axis=-1)
    smallest = jnp.argmin(probs, axis=-1)
    expected = jnp.einsum("bhq,bhqd->bqhd", jnp.min(probs, axis=-1),
                          jnp.take_along_axis(jnp.transpose(v, (0, 2, 1, 3)), smallest[..., None], axis=2))
    np.testing.assert_allclose(ref_out, expected, atol=1e-6)


@pytest.mark.parametrize("ratio, masked_per_row", [(0.25, 3), (0.4, 6)])
def test_tied_keys_mask_every_entry_tied_with_the_kth(ratio, masked_per_row):
    # 4 distinct integer keys, each 3 times: every row's relations come in tied triples, and
    # integer dot products (scale 1/2) are exact, so both implementations see the same ties.
    # k = 3 masks exactly the top triple; k = 4 falls inside the second triple, which is masked whole.
    rng = np.random.default_rng(3)
    heads, head_dim = 2, 4
    distinct = rng.integers(-2, 3, size=(4, heads, head_dim)).astype(np.float32)
    distinct[:, :, 0] = np.arange(4)[:, None] * 20.0  # dominates: a row's four relations stay distinct
    order = rng.permutation(12)
    k = jnp.asarray(np.repeat(distinct, 3, axis=0)[order][None])
    q = jnp.asarray(np.concatenate([np.ones((5, heads, 1)), rng.integers(-1, 2, size=(5, heads, head_dim - 1))],
                                   axis=-1).astype(np.float32)[None])
    v = jnp.asarray(rng.normal(size=k.shape).astype(np.float32))
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    assert masked_count(ratio, 12) in (3, 4)
    blocks = RelationMaskBlockSizes(block_q=8, block_kv=8)
    _compare(q, k, v, cotangent, ratio, blocks, atol=2e-5)
    # The reference masks whole triples; the kernel agrees entry by entry (v = one-hot columns).
    eye = jnp.broadcast_to(jnp.eye(12)[None, :, None, :], (1, 12, heads, 12))
    probe = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, 8)))
    keys12 = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, 8)))
    kept_ref = relation_mask_attention_reference(probe, keys12, eye, ratio=ratio) > 0
    kept = relation_mask_attention(probe, keys12, eye, ratio=ratio, impl="pallas", block_sizes=blocks) > 0
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_ref))
    assert np.all(np.sum(~np.asarray(kept_ref), axis=-1) == masked_per_row)


def test_bfloat16_matches_reference_loosely():
    q, k, v, cotangent = _inputs(1, 24, 40, 2, 16, dtype=jnp.bfloat16, seed=4)
    _compare(q, k, v, cotangent, 0.5, RelationMaskBlockSizes(block_q=16, block_kv=16), atol=3e-2)


def test_dispatcher_and_errors():
    q, k, v, _ = _inputs(1, 6, 6, 1, 4, seed=5)
    reference = relation_mask_attention_reference(q, k, v, ratio=0.5)
    # "auto" is the reference on CPU; "reference" always is.
    np.testing.assert_array_equal(relation_mask_attention(q, k, v, ratio=0.5, impl="auto"), reference)
    np.testing.assert_array_equal(relation_mask_attention(q, k, v, ratio=0.5, impl="reference"), reference)
    with pytest.raises(ValueError, match="kernels.impl"):
        relation_mask_attention(q, k, v, ratio=0.5, impl="triton")
    with pytest.raises(ValueError, match="relation masking ratio"):
        relation_mask_attention(q, k, v, ratio=1.0, impl="pallas")
    with pytest.raises(ValueError, match="incompatible"):
        relation_mask_attention_pallas(q, k[..., :2], v[..., :2], ratio=0.5)
    with pytest.raises(ValueError, match="power of two"):
        relation_mask_attention_pallas(q, k, v, ratio=0.5, backend="gpu",
                                       block_sizes=RelationMaskBlockSizes(block_q=24))


@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_gpu_and_tpu(backend, platform):
    """The real Triton / Mosaic paths (not interpret mode) trace and lower, forward and backward."""
    q = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 130, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        out = relation_mask_attention_pallas(q, k, v, ratio=0.25, backend=backend, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert text.count(marker) >= 3  # forward, dq and dk/dv kernels


def test_bench_main_prints_a_table(capsys):
    from medjax.bench import relation_mask as bench

    bench.main(["--tokens", "16", "--heads", "1", "--head-dim", "8", "--ratios", "0.5", "--iters", "1",
                "--warmup", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith("| 16 |")]
    assert [row.split(" | ")[4] for row in rows] == ["fwd", "fwd+bwd"]
    assert all(float(row.rstrip(" |").split(" | ")[-1]) < 1e-5 for row in rows)  # kernel vs reference
