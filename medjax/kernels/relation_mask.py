"""Top-k relation-masking attention (MRM, Yang et al., ICCV 2023, Sec. 3.2.1).

R = softmax(Q K^T / sqrt(d)) per head; for each row p, r_p is the k-th largest entry of the
row with k = floor(ratio * kv_tokens); entries >= r_p are set to 0 (ties with r_p are masked
too, k = 0 masks nothing), the row is NOT renormalised, and the output is R^M V.

`relation_mask_attention_reference` is the definition, in plain jnp. It materialises the
(q_tokens, kv_tokens) matrix per head; the Pallas kernel (same contract) avoids that:

  grid (batch, heads, query blocks); per query block, over key blocks of the same head:
  1. stats pass: row max m of the raw logits s = q.k and l = sum_j exp((s_j - m) / sqrt(d));
  2. search passes (no sort): the k-th smallest gap y = m - s of each row is found exactly by
     a (2**search_bits)-ary search over the bit patterns of non-negative float32 (ordered like
     the values), counting gaps <= each candidate over all key blocks;
  3. output pass: p = exp(-y / sqrt(d)) / l; an entry is kept iff y_j > y_k and p_j < p_k with
     p_k the same formula at y_k. p is monotone in y, so this masks exactly the entries with
     p_j >= p_k (the k-th largest probability, ties in p included) and never renormalises;
     the kept p are accumulated times V.
The backward pass (custom_vjp) recomputes p and the mask per tile from the saved per-row
(m, l, y_k) instead of storing the matrix: dV = (M*P)^T dO, dS = P * (M * dO V^T - delta) with
delta = rowsum(dO * O), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d). Memory is linear in tokens.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medjax.kernels import _pallas_util as pu


def masked_count(ratio: float, kv_tokens: int) -> int:
    """k = floor(ratio * kv_tokens): how many of the largest relations each row masks."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"relation masking ratio must be in [0, 1), got {ratio}")
    return int(math.floor(ratio * kv_tokens))


def relation_mask_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, ratio: float) -> jax.Array:
    """MRM Eq. (self/cross relation masking): z = R^M V.

    q: (batch, q_tokens, heads, head_dim); k, v: (batch, kv_tokens, heads, head_dim).
    Returns (batch, q_tokens, heads, head_dim) in q's dtype; the softmax is computed in fp32.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    kv_tokens = k.shape[1]
    top = masked_count(ratio, kv_tokens)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    if top > 0:
        kth_largest = jax.lax.top_k(jax.lax.stop_gradient(probs), top)[0][..., top - 1:top]
        probs = jnp.where(probs >= kth_largest, 0.0, probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


from medjax.kernels.relation_mask_tiles import (_STATS, _WHERE, RelationMaskBlockSizes, _dkv_kernel, _dq_kernel,
                                              _forward_kernel, _Plan)

# --------------------------------------------------------------------------- Pallas launches


def _to_heads_major(x: jax.Array, tokens: int, head_dim: int) -> jax.Array:
    """(batch, tokens, heads, d) -> zero-padded (batch, heads, tokens', d')."""
    return pu.pad_axis(pu.pad_axis(jnp.transpose(x, (0, 2, 1, 3)), 2, tokens), 3, head_dim)


def _from_heads_major(x: jax.Array, tokens: int, head_dim: int) -> jax.Array:
    return jnp.transpose(x[:, :, :tokens, :head_dim], (0, 2, 1, 3))


def _row_spec(plan: _Plan, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, plan.block_q, width), lambda b, h, i: (b, h, i, 0))


def _whole_spec(length: int, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, length, width), lambda b, h, i: (b, h, 0, 0))


def _forward(q, k, v, plan: _Plan):
    """Padded heads-major launch; returns the output (q's layout) and the (b, h, q', 4) stats."""
    batch, q_tokens, heads, head_dim = q.shape
    qp = _to_heads_major(q, pu.round_up(q_tokens, plan.block_q), plan.head_dim)
    kp = _to_heads_major(k, pu.round_up(plan.kv_tokens, plan.block_kv), plan.head_dim)
    vp = _to_heads_major(v, kp.shape[2], plan.head_dim)
    grid = (batch, heads, qp.shape[2] // plan.block_q)
    out, stats = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=grid,
        in_specs=[_row_spec(plan, plan.head_dim), _whole_spec(kp.shape[2], plan.head_dim),
                  _whole_spec(kp.shape[2], plan.head_dim)],
        out_specs=[_row_spec(plan, plan.head_dim), _row_spec(plan, _STATS)],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, qp.shape[2], _STATS), jnp.float32)],
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="relation_mask_forward",
    )(qp, kp, vp)
    return _from_heads_major(out, q_tokens, head_dim), stats


def _backward(q, k, v, out, stats, g, plan: _Plan):
    batch, q_tokens, heads, head_dim = q.shape
    delta = jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32), axis=-1)  # (b, q, h)
    delta = pu.pad_axis(jnp.transpose(delta, (0, 2, 1)), 2, stats.shape[2])
    stats = stats.at[..., 3].set(delta)
    qp = _to_heads_major(q, stats.shape[2], plan.head_dim)
    gp = _to_heads_major(g.astype(q.dtype), stats.shape[2], plan.head_dim)
    kp = _to_heads_major(k, pu.round_up(plan.kv_tokens, plan.block_kv), plan.head_dim)
    vp = _to_heads_major(v, kp.shape[2], plan.head_dim)
    q_pad, kv_pad = qp.shape[2], kp.shape[2]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(batch, heads, q_pad // plan.block_q),
        in_specs=[_row_spec(plan, plan.head_dim), _whole_spec(kv_pad, plan.head_dim),
                  _whole_spec(kv_pad, plan.head_dim), _row_spec(plan, plan.head_dim), _row_spec(plan, _STATS)],
        out_specs=_row_spec(plan, plan.head_dim),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="relation_mask_backward_dq",
    )(qp, kp, vp, gp, stats)
    kv_spec = pl.BlockSpec((None, None, plan.block_kv, plan.head_dim), lambda b, h, j: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(batch, heads, kv_pad // plan.block_kv),
        in_specs=[_whole_spec(q_pad, plan.head_dim), _whole_spec(q_pad, plan.head_dim),
                  _whole_spec(q_pad, _STATS), kv_spec, kv_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name="relation_mask_backward_dkv",
    )(qp, gp, stats, kp, vp)
    return (_from_heads_major(dq, q_tokens, head_dim), _from_heads_major(dk, plan.kv_tokens, head_dim),
            _from_heads_major(dv, plan.kv_tokens, head_dim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _relation_mask_pallas(q, k, v, plan: _Plan):
    return _forward(q, k, v, plan)[0]


def _relation_mask_pallas_fwd(q, k, v, plan: _Plan):
    out, stats = _forward(q, k, v, plan)
    return out, (q, k, v, out, stats)


def _relation_mask_pallas_bwd(plan: _Plan, residuals, g):
    return _backward(*residuals, g, plan)


_relation_mask_pallas.defvjp(_relation_mask_pallas_fwd, _relation_mask_pallas_bwd)


def _check_inputs(q, k, v, where: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{where}: q, k, v must be (batch, tokens, heads, head_dim); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{where}: incompatible q {q.shape}, k {k.shape}, v {v.shape} "
                         "(expected k == v shapes and the same batch, heads and head_dim as q)")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{where}: q and k need at least one token; got {q.shape}, {k.shape}")


def relation_mask_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, *, ratio: float,
                                   block_sizes: RelationMaskBlockSizes | None = None,
                                   interpret: bool | None = None, backend: str | None = None) -> jax.Array:
    """MRM relation masking (Sec. 3.2.1) as a Pallas kernel; same contract as the reference.

    backend: which lowering ("gpu": Triton, "tpu": Mosaic, "cpu"); None = the default backend.
    interpret: None = interpret mode unless the backend is a GPU or TPU.
    """
    where = f"{_WHERE} relation_mask_attention_pallas"
    _check_inputs(q, k, v, where)
    backend = pu.resolve_backend(backend, where)
    sizes = block_sizes or RelationMaskBlockSizes.for_backend(backend)
    pu.check_block("block_q", sizes.block_q, backend, where)
    pu.check_block("block_kv", sizes.block_kv, backend, where)
    if not 1 <= sizes.search_bits <= 4:
        raise ValueError(f"{where}: search_bits must be in 1..4, got {sizes.search_bits}")
    # Triton dots need every dim >= 16; Mosaic wants (128, 128) tiles for the transposes.
    minimum = {"gpu": (16, 16), "tpu": (128, 128)}.get(backend, (8, 8))
    head_dim = q.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    plan = _Plan(
        top=masked_count(ratio, k.shape[1]),
        scale=1.0 / math.sqrt(head_dim),
        kv_tokens=k.shape[1],
        block_q=pu.fit_block(sizes.block_q, q.shape[1], minimum[0]),
        block_kv=pu.fit_block(sizes.block_kv, k.shape[1], minimum[1]),
        head_dim=max(16, pl.next_power_of_2(head_dim)) if backend == "gpu" else head_dim,
        search_bits=sizes.search_bits,
        backend=backend,
        interpret=pu.resolve_interpret(interpret, backend),
        num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    launch = lambda q_, k_, v_: _relation_mask_pallas(q_, k_, v_, plan)  # noqa: E731
    out = pu.shard_map_over_batch(launch, (q.astype(dtype), k.astype(dtype), v.astype(dtype)),
                                  head_dims=(2, 2, 2), out_head_dim=2)
    return out.astype(q.dtype)


def relation_mask_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, ratio: float, impl: str = "auto",
                            block_sizes: RelationMaskBlockSizes | None = None,
                            interpret: bool | None = None) -> jax.Array:
    """MRM relation-masking attention through the implementation chosen by `impl`.

    impl (config `kernels.impl`): "auto" = the Pallas kernel on GPU/TPU and the reference on
    CPU; "reference" = `relation_mask_attention_reference`; "pallas" = the kernel everywhere
    (interpret mode on CPU). block_sizes / interpret only affect the kernel.
    """
    if pu.use_pallas(impl, f"{_WHERE} relation_mask_attention"):
        return relation_mask_attention_pallas(q, k, v, ratio=ratio, block_sizes=block_sizes, interpret=interpret)
    return relation_mask_attention_reference(q, k, v, ratio=ratio)
