"""Tile-level pieces of the relation-masking Pallas kernel (medjax/kernels/relation_mask.py): block sizes,
the static launch plan, the per-tile logits / probabilities / mask decisions, the exact k-th-gap search and
the three kernel bodies (forward, dQ, dK+dV). See relation_mask.py's docstring for the algorithm
(MRM, Yang et al., ICCV 2023, Sec. 3.2.1)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from medjax.kernels import _pallas_util as pu

_WHERE = "medjax/kernels/relation_mask.py"
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # logit of a padded key column
_INF_BITS = 0x7F800000  # bit pattern of +inf: non-negative float32 order like their bits
_NT = (((1,), (1,)), ((), ()))  # dot_general numbers for a @ b.T
_STATS = 4  # per-row statistics: m (row max of raw logits), l (softmax sum), y_k, delta


@dataclasses.dataclass(frozen=True)
class RelationMaskBlockSizes:
    """Tiles of the relation-masking kernel (forward and backward use the same tiles, so the
    backward recomputes bit-identical logits and mask decisions).

    block_q / block_kv: query rows per program / key columns per inner step (powers of two
    on GPU, multiples of 8 on TPU; shrunk for short sequences). search_bits: each counting pass
    tests 2**search_bits - 1 thresholds, so the exact k-th value takes ceil(31 / search_bits)
    passes over the keys. num_warps / num_stages: Triton launch parameters (GPU only).
    """

    block_q: int = 64
    block_kv: int = 64
    search_bits: int = 2
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str) -> "RelationMaskBlockSizes":
        if backend == "tpu":  # lane-dense (128) key tiles, sublane-aligned query tiles
            return cls(block_q=128, block_kv=128)
        if backend == "cpu":  # interpret mode: fewer, larger grid steps
            return cls(block_q=128, block_kv=128)
        return cls()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one kernel launch (hashable: a custom_vjp nondiff argument)."""

    top: int
    scale: float
    kv_tokens: int
    block_q: int
    block_kv: int
    head_dim: int  # padded head_dim the kernels see
    search_bits: int
    backend: str
    interpret: bool
    num_warps: int
    num_stages: int

    @property
    def search_passes(self) -> int:
        return pu.ceil_log(_INF_BITS + 1, 1 << self.search_bits)

    def compiler_params(self):
        return pu.compiler_params(self.backend, 3, num_warps=self.num_warps, num_stages=self.num_stages)


def _raw_logits(q: jax.Array, kb: jax.Array, start, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """Unscaled logits q @ kb.T of one tile, padded key columns set to _MASK_VALUE."""
    s = lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32)
    cols = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    valid = cols < plan.kv_tokens
    return jnp.where(valid, s, _MASK_VALUE), valid


def _probs(gap: jax.Array, l: jax.Array, plan: _Plan) -> jax.Array:
    """softmax entries from the gaps y = m - s: exp(-y / sqrt(d)) / l (one formula everywhere)."""
    return jnp.exp(gap * -plan.scale) / l


def _kept(valid: jax.Array, gap: jax.Array, p: jax.Array, y_k: jax.Array, l: jax.Array, plan: _Plan):
    """The entries R^M keeps: p < p_k, i.e. below the k-th largest probability (ties masked)."""
    if plan.top == 0:
        return valid
    p_k = _probs(y_k, l, plan)
    return valid & (gap > y_k) & (p < p_k)


def _pack_stats(m, l, y_k, delta):
    col = lax.broadcasted_iota(jnp.int32, (m.shape[0], _STATS), 1)
    return jnp.where(col == 0, m, jnp.where(col == 1, l, jnp.where(col == 2, y_k, delta)))


def _unpack_stats(stats: jax.Array):
    """Columns of a (rows, 4) stats tile as (rows, 1) arrays (masked sums: no lane slicing)."""
    col = lax.broadcasted_iota(jnp.int32, stats.shape, 1)
    return tuple(jnp.sum(jnp.where(col == c, stats, 0.0), axis=1, keepdims=True) for c in range(_STATS))


def _row_stats(q, k_ref, plan: _Plan, num_kv_blocks: int):
    """Pass 1: running max m of the raw logits and l = sum_j exp((s_j - m) * scale)."""
    rows = q.shape[0]

    def body(j, carry):
        m, l = carry
        start = pl.multiple_of(j * plan.block_kv, plan.block_kv)
        s, _ = _raw_logits(q, k_ref[pl.ds(start, plan.block_kv), :], start, plan)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        l = l * jnp.exp((m - m_new) * plan.scale) + jnp.sum(
            jnp.exp((s - m_new) * plan.scale), axis=1, keepdims=True)
        return m_new, l

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    return lax.fori_loop(0, num_kv_blocks, body, init)


def _kth_smallest_gap(q, k_ref, m, plan: _Plan, num_kv_blocks: int) -> jax.Array:
    """Pass 2: y_k, the top-th smallest gap y = m - s of each row, exactly, without sorting.

    Invariant on the int32 bit patterns (lo, hi]: count(y <= lo) < top <= count(y <= hi).
    Each pass counts against 2**bits - 1 evenly spaced candidates and keeps the sub-interval
    where the count crosses `top`; when hi = lo + 1, hi is the bit pattern of y_k.
    """
    rows = q.shape[0]
    fan = 1 << plan.search_bits

    def search_pass(_, bounds):
        lo, hi = bounds
        step = lax.shift_right_logical(hi - lo + (fan - 1), jnp.int32(plan.search_bits))
        cands = [jnp.minimum(lo + i * step, hi) for i in range(1, fan)]
        limits = [lax.bitcast_convert_type(c, jnp.float32) for c in cands]

        def count_block(j, counts):
            start = pl.multiple_of(j * plan.block_kv, plan.block_kv)
            s, valid = _raw_logits(q, k_ref[pl.ds(start, plan.block_kv), :], start, plan)
            gap = m - s
            return tuple(n + jnp.sum(jnp.where(valid & (gap <= t), 1.0, 0.0), axis=1, keepdims=True)
                         for n, t in zip(counts, limits))

        counts = lax.fori_loop(0, num_kv_blocks, count_block,
                               tuple(jnp.zeros((rows, 1), jnp.float32) for _ in cands))
        for cand, n in zip(cands, counts):
            below = n < plan.top
            lo = jnp.where(below, jnp.maximum(lo, cand), lo)
            hi = jnp.where(below, hi, jnp.minimum(hi, cand))
        return lo, hi

    init = (jnp.full((rows, 1), -1, jnp.int32), jnp.full((rows, 1), _INF_BITS, jnp.int32))
    _, hi = lax.fori_loop(0, plan.search_passes, search_pass, init)
    return lax.bitcast_convert_type(hi, jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, stats_ref, *, plan: _Plan):
    q = q_ref[...]
    num_kv_blocks = k_ref.shape[0] // plan.block_kv
    m, l = _row_stats(q, k_ref, plan, num_kv_blocks)
    if plan.top > 0:
        y_k = _kth_smallest_gap(q, k_ref, m, plan, num_kv_blocks)
    else:
        y_k = jnp.zeros_like(m)

    def body(j, acc):
        start = pl.multiple_of(j * plan.block_kv, plan.block_kv)
        s, valid = _raw_logits(q, k_ref[pl.ds(start, plan.block_kv), :], start, plan)
        gap = m - s
        p = _probs(gap, l, plan)
        p = jnp.where(_kept(valid, gap, p, y_k, l, plan), p, 0.0)
        vb = v_ref[pl.ds(start, plan.block_kv), :]
        return acc + jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)
    stats_ref[...] = _pack_stats(m, l, y_k, jnp.zeros_like(m))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, dq_ref, *, plan: _Plan):
    q, do = q_ref[...], do_ref[...]
    m, l, y_k, delta = _unpack_stats(stats_ref[...])

    def body(j, dq):
        start = pl.multiple_of(j * plan.block_kv, plan.block_kv)
        kb = k_ref[pl.ds(start, plan.block_kv), :]
        vb = v_ref[pl.ds(start, plan.block_kv), :]
        s, valid = _raw_logits(q, kb, start, plan)
        gap = m - s
        p = _probs(gap, l, plan)
        dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
        ds = p * (jnp.where(_kept(valid, gap, p, y_k, l, plan), dp, 0.0) - delta)
        return dq + jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, k_ref.shape[0] // plan.block_kv, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, do_ref, stats_ref, k_ref, v_ref, dk_ref, dv_ref, *, plan: _Plan):
    kb, vb = k_ref[...], v_ref[...]
    start_k = pl.program_id(2) * plan.block_kv

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * plan.block_q, plan.block_q), plan.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        m, l, y_k, delta = _unpack_stats(stats_ref[rows, :])
        s, valid = _raw_logits(q, kb, start_k, plan)
        gap = m - s
        p = _probs(gap, l, plan)
        kept = _kept(valid, gap, p, y_k, l, plan)
        dv = dv + jnp.dot(jnp.where(kept, p, 0.0).T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
        ds = p * (jnp.where(kept, dp, 0.0) - delta)
        dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // plan.block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
