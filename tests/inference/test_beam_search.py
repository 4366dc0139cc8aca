"""Beam search (medjax/inference/beam_search.py) against exhaustive search when the beam is wide enough to
keep every prefix, against a step-by-step Python transcription of Hugging Face 4.6's BeamSearchScorer for
narrow beams (early stopping, EOS ranks, finalize), on a tiny report decoder, and compiled once."""
import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.inference.beam_search import beam_search
from medjax.models.ptunifier_reportgen import ReportDecoder

V, EOS, PAD = 4, 2, 1


def toy_tables(seed: int, vocab: int = V, length: int = 8, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for s in ((vocab, vocab), (vocab, vocab),
                                                                                (length, vocab)))


def toy_fn(tables):
    """A causal toy model: logits(y_<=t) = A[y_t] + B[y_{t-1}] + C[t]."""
    a, b, c = tables

    def fn(tokens, t):
        last = jax.lax.dynamic_index_in_dim(tokens, t, 1, keepdims=False)
        prev = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), 1, keepdims=False)
        return a[last] + jnp.where(t > 0, b[prev], 0.0) + c[t]
    return fn


_toy_step = jax.jit(lambda tables, tokens, t: toy_fn(tables)(tokens, t))


def toy_logits(seed: int, vocab: int = V, length: int = 8, scale: float = 2.0):
    """The toy model of `seed` as a jitted (tokens, t) -> logits (compiled once for all seeds)."""
    tables = toy_tables(seed, vocab, length, scale)
    return lambda tokens, t: _toy_step(tables, tokens, t)


@functools.partial(jax.jit, static_argnames=("k", "length", "sample"))
def toy_beam_search(tables, starts, lp, key, *, k, length, sample=False):
    return beam_search(toy_fn(tables), starts, beam_size=k, max_length=length, eos_id=EOS, pad_id=PAD,
                       length_penalty=lp, sample=sample, top_k=3, rng=key)


def log_probs(fn, prefix, length):
    """log softmax of fn's next-token logits after `prefix` (fn jitted: one compile per test)."""
    tokens = np.full((1, length), PAD, np.int32)
    tokens[0, :len(prefix)] = prefix
    logits = np.asarray(fn(jnp.asarray(tokens), jnp.int32(len(prefix) - 1))[0], np.float64)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def brute_force(fn, start, length, lp=1.0):
    """The best hypothesis over every sequence: ended by EOS (score / tokens before EOS) or reaching length."""
    best = (-np.inf, None)
    for n in range(1, length):  # generated tokens, the last may be EOS
        for tail in itertools.product(range(V), repeat=n):
            if EOS in tail[:-1]:
                continue
            seq, total = [start], 0.0
            for tok in tail:
                total += log_probs(fn, seq, length)[tok]
                seq = seq + [tok]
            if tail[-1] == EOS:
                best = max(best, (total / (len(seq) - 1) ** lp, seq[:-1]), key=lambda x: x[0])
            elif len(seq) == length:
                best = max(best, (total / length ** lp, seq), key=lambda x: x[0])
    return best


def hf46_reference(fn, start, k, length, lp=1.0):
    """transformers 4.6 `beam_search` + `BeamSearchScorer` for one row, transcribed step by step."""
    beams, scores = [[start]] * k, [0.0] + [-1e9] * (k - 1)
    hyps, done = [], False  # (score, tokens)
    cur = 1
    while cur < length:
        cand = [(scores[i] + lp_, i, tok) for i in range(k)
                for tok, lp_ in enumerate(log_probs(fn, beams[i], length))]
        cand.sort(key=lambda c: -c[0])
        cand = cand[:2 * k]
        new_beams, new_scores = [], []
        for rank, (s, i, tok) in enumerate(cand):
            if tok == EOS:
                if rank >= k:
                    continue
                score = s / cur ** lp
                if len(hyps) < k or score > min(h[0] for h in hyps):
                    hyps.append((score, beams[i]))
                    if len(hyps) > k:
                        hyps.remove(min(hyps, key=lambda h: h[0]))
            else:
                new_beams.append(beams[i] + [tok])
                new_scores.append(s)
            if len(new_beams) == k:
                break
        done = len(hyps) >= k and min(h[0] for h in hyps) >= cand[0][0] / cur ** lp
        beams, scores, cur = new_beams, new_scores, cur + 1
        if done:
            break
    if not done:
        for b, s in zip(beams, scores):
            score = s / length ** lp
            if len(hyps) < k or score > min(h[0] for h in hyps):
                hyps.append((score, b))
                if len(hyps) > k:
                    hyps.remove(min(hyps, key=lambda h: h[0]))
    return max(hyps, key=lambda h: h[0])


def _padded(seq, length):
    """A hypothesis as beam_search returns it: its tokens, then PAD (tokens may equal PAD themselves)."""
    return list(seq) + [PAD] * (length - len(seq))


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_equals_exhaustive_search(seed):
    fn, length = toy_logits(seed, length=4), 4
    seqs, scores = toy_beam_search(toy_tables(seed, length=4), jnp.array([0, 3], jnp.int32), 1.0, jax.random.key(0),
                                   k=18, length=length)
    for row, start in enumerate([0, 3]):
        score, best = brute_force(fn, start, length)
        assert list(np.asarray(seqs[row])) == _padded(best, length)
        np.testing.assert_allclose(float(scores[row]), score, rtol=1e-5)


@pytest.mark.parametrize("seed,k,lp", [(3, 2, 1.0), (4, 2, 0.0), (5, 3, 1.0), (6, 3, 2.0)])
def test_narrow_beam_follows_hf_beam_search_scorer(seed, k, lp):
    fn, length = toy_logits(seed, length=7), 7
    seqs, scores = toy_beam_search(toy_tables(seed, length=7), jnp.array([0, 3], jnp.int32), lp, jax.random.key(0),
                                   k=k, length=length)
    for row, start in enumerate([0, 3]):
        score, best = hf46_reference(fn, start, k, length, lp)
        assert list(np.asarray(seqs[row])) == _padded(best, length)
        np.testing.assert_allclose(float(scores[row]), score, rtol=1e-5)


def test_tiny_decoder_beam_search_is_exhaustive_and_compiles_once():
    decoder = ReportDecoder(V, width=8, depth=1, num_heads=2, mlp_dim=16, max_positions=12, pad_token_id=PAD,
                            dropout=0.0)
    states = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8))
    params = nn.meta.unbox(jax.jit(decoder.init)(jax.random.PRNGKey(0), jnp.zeros((2, 4), jnp.int32), states))
    length = 4

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, states, starts):
        rep = jnp.repeat(states, 18, axis=0)
        fn = lambda tokens, t: decoder.apply(params, tokens, rep, None, t)  # noqa: E731
        return beam_search(fn, starts, beam_size=18, max_length=length, eos_id=EOS, pad_id=PAD)

    seqs, scores = run(params, states, jnp.array([0, 0], jnp.int32))
    one = jax.jit(lambda tokens, t, st: decoder.apply(params, tokens, st, None, t))
    for row in range(2):
        score, best = brute_force(lambda tokens, t, row=row: one(tokens, t, states[row:row + 1]), 0, length)
        assert list(np.asarray(seqs[row])) == _padded(best, length)
        np.testing.assert_allclose(float(scores[row]), score, rtol=1e-4)
    run(params, states * 2.0, jnp.array([3, 0], jnp.int32))  # new values, same shapes: no second trace


def test_beam_sampling_draws_valid_hypotheses_and_depends_on_the_key():
    tables, length = toy_tables(7, length=6, scale=0.3), 6
    run = functools.partial(toy_beam_search, tables, jnp.zeros((4,), jnp.int32), 1.0, k=3, length=length, sample=True)
    a, sa = run(jax.random.PRNGKey(0))
    b, _ = run(jax.random.PRNGKey(1))
    assert a.shape == (4, length) and np.isfinite(np.asarray(sa)).all()
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a)[:, 0] == 0).all()  # each row starts with its start token
