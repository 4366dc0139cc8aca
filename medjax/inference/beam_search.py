"""Beam search at static shapes under `jax.jit`, as Hugging Face transformers 4.6 `generate(num_beams=K)`
computes it (the version PTUnifier's released code pins; its `BeamSearchScorer` / `BeamHypotheses`):

    scores_k(y_<=t) = sum_i log softmax(logits(y_<i))[y_i]           cumulative log-probabilities
    per step: the top 2K of scores + log p over (beam, token); EOS candidates ranked < K become finished
              hypotheses with score / len^length_penalty (len = the tokens before EOS, start included);
              the first K non-EOS candidates continue
    a row is done once it holds K hypotheses and  best candidate / cur_len^lp <= worst hypothesis
    at max_length the live beams are finished too (len = max_length); the answer is the best hypothesis.

The initial beams are K copies of the start token with scores (0, -1e9, ...), as HF. `sample=True` is HF's
beam *sampling* (`do_sample=True, num_beams=K`, what the released PTUnifier config runs): per beam the
cumulative scores are cut to their top `top_k` (HF's default 50), 2K candidates are drawn without
replacement from softmax over all (beam, token) (Gumbel top-k, the distribution of torch.multinomial
without replacement) and taken in score order.

`logits_fn(tokens (B*K, L) int32, t) -> (B*K, V)` gives the next-token logits after position t of each
sequence (positions > t hold `pad_id` and must not matter: a causal decoder). Everything is one
`lax.while_loop`; shapes depend only on (B, K, L, V).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG = -1e9  # HF's score of the initial duplicate beams


class BeamState(NamedTuple):
    t: jax.Array               # () position of the last written token
    alive: jax.Array           # (B, K, L) int32
    alive_scores: jax.Array    # (B, K) cumulative log-probabilities
    finished: jax.Array        # (B, K, L) int32
    finished_scores: jax.Array  # (B, K) normalised scores, -inf for empty slots
    count: jax.Array           # (B,) hypotheses added (HF len(beam_hyp)), at most K
    done: jax.Array            # (B,) bool


def _merge(finished, finished_scores, new, new_scores, k):
    """Top k of the old and the new hypotheses by score (HF's add-and-drop-the-worst)."""
    tokens = jnp.concatenate([finished, new], axis=1)
    scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    top, idx = jax.lax.top_k(scores, k)
    return jnp.take_along_axis(tokens, idx[..., None], axis=1), top


def beam_search(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], start_tokens: jax.Array, *, beam_size: int,
                max_length: int, eos_id: int, pad_id: int, length_penalty: float = 1.0, sample: bool = False,
                top_k: int = 50, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sequences (B, max_length) int32 starting with the start token, padded with `pad_id` after the end,
    scores (B,) of the chosen hypotheses). Jit-compatible: wrap the caller in `jax.jit`."""
    if beam_size < 1 or max_length < 2:
        raise ValueError(f"medjax/inference/beam_search.py: beam_size={beam_size} (>= 1) and max_length={max_length} "
                         "(>= 2: the start token and at least one generated token) are required")
    if sample and rng is None:
        raise ValueError("medjax/inference/beam_search.py: sample=True needs an rng")
    b, k, length = start_tokens.shape[0], beam_size, max_length
    alive = jnp.full((b, k, length), pad_id, jnp.int32).at[:, :, 0].set(start_tokens.astype(jnp.int32)[:, None])
    state = BeamState(t=jnp.int32(0), alive=alive,
                      alive_scores=jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),
                      finished=jnp.full((b, k, length), pad_id, jnp.int32),
                      finished_scores=jnp.full((b, k), -jnp.inf, jnp.float32),
                      count=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))

    def step(s: BeamState) -> BeamState:
        cur_len = (s.t + 1).astype(jnp.float32)  # tokens so far, start included
        logits = logits_fn(s.alive.reshape(b * k, length), s.t).astype(jnp.float32)
        vocab = logits.shape[-1]
        scores = (jax.nn.log_softmax(logits, -1).reshape(b, k, vocab) + s.alive_scores[..., None])
        if sample:  # HF beam_sample: TopKLogitsWarper on the cumulative scores, multinomial over beams x tokens
            kth = jax.lax.top_k(scores, min(top_k, vocab))[0][..., -1:]
            warped = jnp.where(scores < kth, -jnp.inf, scores).reshape(b, k * vocab)
            gumbel = jax.random.gumbel(jax.random.fold_in(rng, s.t), warped.shape)
            _, idx = jax.lax.top_k(warped + gumbel, 2 * k)
            picked = jnp.take_along_axis(scores.reshape(b, k * vocab), idx, axis=1)
            order = jnp.argsort(-picked, axis=1)  # HF sorts the drawn candidates by score
            cand_scores, idx = jnp.take_along_axis(picked, order, 1), jnp.take_along_axis(idx, order, 1)
        else:
            cand_scores, idx = jax.lax.top_k(scores.reshape(b, k * vocab), 2 * k)
        beam, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        prefixes = jnp.take_along_axis(s.alive, beam[..., None], axis=1)  # (B, 2K, L)
        rank = jnp.arange(2 * k)[None]
        is_eos = token == eos_id
        # finished: EOS candidates among the top K, the hypothesis being the prefix before EOS
        new_fin = jnp.where(is_eos & (rank < k), cand_scores / cur_len ** length_penalty, -jnp.inf)
        finished, finished_scores = _merge(s.finished, s.finished_scores, prefixes, new_fin, k)
        count = jnp.minimum(k, s.count + jnp.sum(is_eos & (rank < k), axis=1))
        # alive: the first K non-EOS candidates in rank order
        keep = jax.lax.top_k(jnp.where(is_eos, -2 * k, -rank), k)[1]
        next_tokens = jnp.take_along_axis(token, keep, 1)
        alive = jnp.take_along_axis(prefixes, keep[..., None], axis=1)
        alive = jax.lax.dynamic_update_slice_in_dim(alive, next_tokens[..., None], s.t + 1, axis=2)
        alive_scores = jnp.take_along_axis(cand_scores, keep, 1)
        worst = jnp.min(finished_scores, axis=1)
        done = (count >= k) & (cand_scores[:, 0] / cur_len ** length_penalty <= worst)
        frozen = s.done  # rows done at an earlier step keep everything (HF skips them)
        pick = lambda old, new: jnp.where(frozen.reshape((b,) + (1,) * (new.ndim - 1)), old, new)  # noqa: E731
        return BeamState(t=s.t + 1, alive=pick(s.alive, alive), alive_scores=pick(s.alive_scores, alive_scores),
                         finished=pick(s.finished, finished), finished_scores=pick(s.finished_scores, finished_scores),
                         count=pick(s.count, count), done=frozen | done)

    state = jax.lax.while_loop(lambda s: (s.t + 1 < length) & ~jnp.all(s.done), step, state)
    # finalize: rows not done add their live beams as hypotheses of length max_length
    final = jnp.where(state.done[:, None], -jnp.inf, state.alive_scores / float(length) ** length_penalty)
    finished, finished_scores = _merge(state.finished, state.finished_scores, state.alive, final, k)
    best = jnp.argmax(finished_scores, axis=1)
    sequences = jnp.take_along_axis(finished, best[:, None, None], axis=1)[:, 0]
    return sequences, jnp.take_along_axis(finished_scores, best[:, None], axis=1)[:, 0]
