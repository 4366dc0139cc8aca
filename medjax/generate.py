"""Autoregressive generation with a KV cache for `medjax.nn.llama.Llama` and `medjax.models.llava.Llava`,
as Hugging Face's `generate` (transformers 5.23) computes it:

    sequences = generate(model, variables, input_ids, max_new_tokens=32, attention_mask=mask,
                         pixel_values=None, temperature=0.0, top_p=1.0, eos_token_id=2, rng=None)

- One `jax.jit` program per (model, batch, prompt length, max_new_tokens, greedy/sampling, with pixels):
  the prefill writes the whole (left-padded) prompt into a cache of prompt + max_new_tokens slots, then a
  `lax.while_loop` decodes one token per step at static shapes.
- temperature 0: greedy (argmax). temperature > 0: softmax(logits / temperature) restricted to the smallest
  set of tokens whose probability reaches `top_p` (HF's TemperatureLogitsWarper then TopPLogitsWarper, at least
  one token kept), sampled with `rng` (default key 0) folded with the step.
- A row stops at any of `eos_token_id`; later tokens of that row are the (first) EOS, as HF pads with its
  pad token (= EOS when none is set). Generation ends early only when every row has stopped; the result
  is (batch, tokens + generated) int32, the prompt included, as HF's `sequences`.
- Prompts are left-padded (`attention_mask` 0 before the text); positions are cumsum(mask) - 1.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxInputError
from medjax.models.llava import Llava, check_image_tokens
from medjax.nn.llama import default_position_ids


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Logits with every token outside the nucleus set to -inf: sorted ascending, tokens whose cumulative
    probability is <= 1 - top_p are removed, the most likely token always kept (HF TopPLogitsWarper)."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def choose_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  sampling: bool) -> jax.Array:
    """Next tokens (batch,) int32 from float32 logits (batch, vocab): argmax, or a nucleus sample."""
    if not sampling:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = top_p_filter(logits / temperature, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(model, max_new_tokens: int, sampling: bool, with_pixels: bool):
    """The jitted generation program of one model and setting (cached: no recompiling between calls)."""

    def run(variables, input_ids, attention_mask, pixel_values, rng, temperature, top_p, eos):
        batch, length = input_ids.shape
        total = length + max_new_tokens
        cache = model.init_cache(batch, total)
        kv_mask = jnp.concatenate([attention_mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
        positions = default_position_ids(attention_mask)
        extra = (pixel_values,) if with_pixels else ()
        logits, cache = model.apply(variables, input_ids, cache, 0, kv_mask, positions, *extra, method=model.decode)
        tokens = jnp.concatenate([input_ids, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
        state = (jnp.int32(0), tokens, cache, logits[:, -1], positions[:, -1], kv_mask, jnp.zeros((batch,), bool))

        def keep_going(state):
            step, *_, finished = state
            return (step < max_new_tokens) & ~jnp.all(finished)

        def one_token(state):
            step, tokens, cache, next_logits, position, kv_mask, finished = state
            token = choose_tokens(next_logits, jax.random.fold_in(rng, step), temperature, top_p, sampling=sampling)
            token = jnp.where(finished, eos[0], token)
            slot = length + step
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], slot, axis=1)
            finished = finished | jnp.any(token[:, None] == eos[None, :], axis=-1)
            kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, jnp.ones((batch, 1), jnp.int32), slot, axis=1)
            position = position + 1
            logits, cache = model.apply(variables, token[:, None], cache, slot, kv_mask, position[:, None],
                                        method=model.decode)
            return step + 1, tokens, cache, logits[:, -1], position, kv_mask, finished

        state = jax.lax.while_loop(keep_going, one_token, state)
        return state[1], state[0]

    return jax.jit(run)


def _eos_array(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.asarray([-1], np.int32)  # matches no token
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    if not ids or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        raise MedjaxInputError(f"generate: eos_token_id must be a token id or a non-empty list of them, got "
                               f"{eos_token_id!r}")
    return np.asarray(ids, np.int32)


def generate(model, variables, input_ids, *, max_new_tokens: int, attention_mask=None, pixel_values=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             rng: jax.Array | None = None) -> jax.Array:
    """Prompt + generated tokens (batch, tokens + new) int32; see the module docstring."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise MedjaxInputError(f"generate: input_ids must be integer (batch, tokens), got {input_ids.dtype} "
                               f"{input_ids.shape}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise MedjaxInputError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise MedjaxInputError(f"generate: expected temperature >= 0 and 0 < top_p <= 1, got temperature="
                               f"{temperature}, top_p={top_p}")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise MedjaxInputError(f"generate: attention_mask has shape {mask.shape}, input_ids {input_ids.shape}")
    if np.any(mask[:, -1] == 0):
        raise MedjaxInputError("generate: attention_mask is 0 at the last prompt position of some rows; pad prompts "
                               "on the left (the tokenizer's padding_side='left')")
    eos = _eos_array(eos_token_id)
    if pixel_values is not None:
        if not isinstance(model, Llava):
            raise MedjaxInputError(f"generate: pixel_values given but {type(model).__name__} takes no image")
        check_image_tokens(input_ids, model.image_token_id, model.num_image_tokens)
    if max_new_tokens == 0:
        return jnp.asarray(input_ids, jnp.int32)
    sampling = temperature > 0
    run = _compiled(model, int(max_new_tokens), sampling, pixel_values is not None)
    rng = jax.random.key(0) if rng is None else rng
    pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    tokens, steps = run(variables, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask), pixels, rng,
                        jnp.float32(temperature if sampling else 1.0), jnp.float32(top_p), jnp.asarray(eos))
    return tokens[:, :input_ids.shape[1] + int(steps)]
