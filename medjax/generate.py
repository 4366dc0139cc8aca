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

`TokenStream` runs the same `prefill` and `decode_step` as two programs compiled ahead of time, yielding each
step's tokens to the host (streaming; `python -m medjax.bench generate` times it). `python -m medjax.generate`
(`CLI_USAGE` below) answers a question about an image with a PathChat / LLaVA checkpoint, streaming the text.
"""
from __future__ import annotations

import functools
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax.cli import entry_point
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


class DecodeState(NamedTuple):
    """What one decoding step carries: `step` tokens generated so far, `tokens` (batch, prompt + max_new_tokens)
    with them written after the prompt, the KV `cache`, the `position` of the last generated token, `kv_mask`
    (cache slots holding real tokens) and which rows have `finished` (emitted an EOS)."""

    step: jax.Array
    tokens: jax.Array
    cache: dict
    position: jax.Array
    kv_mask: jax.Array
    finished: jax.Array


def _emit(state: DecodeState, logits, rng, temperature, top_p, eos, *, prompt_length: int,
          sampling: bool) -> tuple[DecodeState, jax.Array]:
    """Choose the next token of every row from `logits` (batch, vocab) and write it after the prompt (a finished
    row repeats its EOS)."""
    batch = logits.shape[0]
    token = choose_tokens(logits, jax.random.fold_in(rng, state.step), temperature, top_p, sampling=sampling)
    token = jnp.where(state.finished, eos[0], token)
    slot = prompt_length + state.step
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], slot, axis=1)
    kv_mask = jax.lax.dynamic_update_slice_in_dim(state.kv_mask, jnp.ones((batch, 1), jnp.int32), slot, axis=1)
    finished = state.finished | jnp.any(token[:, None] == eos[None, :], axis=-1)
    return state._replace(step=state.step + 1, tokens=tokens, position=state.position + 1, kv_mask=kv_mask,
                          finished=finished), token


def prefill(model, variables, input_ids, attention_mask, pixel_values, rng, temperature, top_p, eos, *,
            max_new_tokens: int, sampling: bool) -> tuple[DecodeState, jax.Array]:
    """The whole (left-padded) prompt written into a cache of prompt + max_new_tokens slots in one pass, and the
    first new token chosen from its last logits: (state, first tokens (batch,))."""
    batch, length = input_ids.shape
    cache = model.init_cache(batch, length + max_new_tokens)
    kv_mask = jnp.concatenate([attention_mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = default_position_ids(attention_mask)
    extra = () if pixel_values is None else (pixel_values,)
    logits, cache = model.apply(variables, input_ids, cache, 0, kv_mask, positions, *extra, method=model.decode)
    tokens = jnp.concatenate([input_ids, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    state = DecodeState(jnp.int32(0), tokens, cache, positions[:, -1], kv_mask, jnp.zeros((batch,), bool))
    return _emit(state, logits[:, -1], rng, temperature, top_p, eos, prompt_length=length, sampling=sampling)


def decode_step(model, variables, state: DecodeState, rng, temperature, top_p, eos, *, max_new_tokens: int,
                sampling: bool) -> tuple[DecodeState, jax.Array]:
    """The last generated token through the model against the cache (one slot), and the next one chosen."""
    prompt_length = state.tokens.shape[1] - max_new_tokens
    slot = prompt_length + state.step - 1
    token = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)
    logits, cache = model.apply(variables, token, state.cache, slot, state.kv_mask, state.position[:, None],
                                method=model.decode)
    return _emit(state._replace(cache=cache), logits[:, -1], rng, temperature, top_p, eos,
                 prompt_length=prompt_length, sampling=sampling)


@functools.lru_cache(maxsize=16)
def _compiled(model, max_new_tokens: int, sampling: bool, with_pixels: bool):
    """The jitted generation program of one model and setting (cached: no recompiling between calls): the
    prefill, then a `lax.while_loop` of decode steps until max_new_tokens or every row has stopped."""
    settings = dict(max_new_tokens=max_new_tokens, sampling=sampling)

    def run(variables, input_ids, attention_mask, pixel_values, rng, temperature, top_p, eos):
        state, _ = prefill(model, variables, input_ids, attention_mask, pixel_values if with_pixels else None, rng,
                           temperature, top_p, eos, **settings)

        def keep_going(state):
            return (state.step < max_new_tokens) & ~jnp.all(state.finished)

        def one_token(state):
            return decode_step(model, variables, state, rng, temperature, top_p, eos, **settings)[0]

        state = jax.lax.while_loop(keep_going, one_token, state)
        return state.tokens, state.step

    return jax.jit(run)


def _eos_array(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.asarray([-1], np.int32)  # matches no token
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    if not ids or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        raise MedjaxInputError(f"generate: eos_token_id must be a token id or a non-empty list of them, got "
                               f"{eos_token_id!r}")
    return np.asarray(ids, np.int32)


def _checked_inputs(model, input_ids, max_new_tokens, attention_mask, pixel_values, temperature, top_p,
                    eos_token_id) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(input_ids, attention_mask, eos ids, pixels) as arrays, or a MedjaxInputError saying what is wrong."""
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
        pixel_values = np.asarray(pixel_values, np.float32)
    return input_ids.astype(np.int32), mask, eos, pixel_values


def generate(model, variables, input_ids, *, max_new_tokens: int, attention_mask=None, pixel_values=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             rng: jax.Array | None = None) -> jax.Array:
    """Prompt + generated tokens (batch, tokens + new) int32; see the module docstring."""
    input_ids, mask, eos, pixels = _checked_inputs(model, input_ids, max_new_tokens, attention_mask, pixel_values,
                                                   temperature, top_p, eos_token_id)
    if max_new_tokens == 0:
        return jnp.asarray(input_ids, jnp.int32)
    sampling = temperature > 0
    run = _compiled(model, int(max_new_tokens), sampling, pixels is not None)
    rng = jax.random.key(0) if rng is None else rng
    tokens, steps = run(variables, jnp.asarray(input_ids), jnp.asarray(mask), pixels, rng,
                        jnp.float32(temperature if sampling else 1.0), jnp.float32(top_p), jnp.asarray(eos))
    return tokens[:, :input_ids.shape[1] + int(steps)]


class _Shapes:
    """A tree of ShapeDtypeStructs riding along an lru_cache key without taking part in it (equal to any other)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Shapes)

    def __hash__(self):
        return 0


@functools.lru_cache(maxsize=8)
def _stream_programs(model, max_new_tokens: int, sampling: bool, shapes_key, abstract: _Shapes):
    """TokenStream's prefill and decode step compiled ahead of time for one model, setting and argument shapes
    (`shapes_key`; cached: a second stream of the same shapes compiles nothing)."""
    variables, inputs, sampling_args = abstract.value
    settings = dict(max_new_tokens=max_new_tokens, sampling=sampling)
    first = jax.jit(functools.partial(prefill, model, **settings))
    state = jax.eval_shape(first, variables, *inputs, *sampling_args)[0]
    step = jax.jit(functools.partial(decode_step, model, **settings), donate_argnums=(1,))
    return (first.lower(variables, *inputs, *sampling_args).compile(),
            step.lower(variables, state, *sampling_args).compile())


class TokenStream:
    """`generate` one token at a time, for streaming: the prefill and one decode step, each compiled ahead of time
    (`compile_seconds`) with the cache donated between steps; iterating yields each step's new tokens (batch,)
    as numpy int32 (the same tokens `generate` returns), until max_new_tokens or every row has emitted an EOS.

        stream = TokenStream(model, variables, ids, max_new_tokens=64, pixel_values=pixels, eos_token_id=2)
        for tokens in stream: ...
    """

    def __init__(self, model, variables, input_ids, *, max_new_tokens: int, attention_mask=None, pixel_values=None,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 rng: jax.Array | None = None):
        input_ids, mask, eos, pixels = _checked_inputs(model, input_ids, max_new_tokens, attention_mask,
                                                       pixel_values, temperature, top_p, eos_token_id)
        if max_new_tokens < 1:
            raise MedjaxInputError(f"generate: a token stream needs max_new_tokens >= 1, got {max_new_tokens}")
        sampling = temperature > 0
        self.max_new_tokens, self.eos, self.variables = int(max_new_tokens), eos, variables
        self._inputs = (jnp.asarray(input_ids), jnp.asarray(mask), None if pixels is None else jnp.asarray(pixels))
        self._sampling = (jax.random.key(0) if rng is None else rng, jnp.float32(temperature if sampling else 1.0),
                          jnp.float32(top_p), jnp.asarray(eos))
        start = time.perf_counter()
        shapes = lambda tree: (jax.tree.structure(tree), tuple(  # noqa: E731 - the hashable key of a tree of arrays
            (tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                (variables, self._inputs, self._sampling))
        self._prefill, self._step = _stream_programs(model, self.max_new_tokens, sampling, shapes(abstract),
                                                     _Shapes(abstract))
        self.compile_seconds = time.perf_counter() - start  # ~0 when this model and these shapes ran before

    def __iter__(self) -> Iterator[np.ndarray]:
        state, token = self._prefill(self.variables, *self._inputs, *self._sampling)
        finished = np.zeros(self._inputs[0].shape[0], bool)
        for step in range(self.max_new_tokens):
            if step:
                state, token = self._step(self.variables, state, *self._sampling)
            token = np.asarray(token)
            finished |= np.isin(token, self.eos)
            yield token
            if finished.all():
                return


# ---- python -m medjax.generate ------------------------------------------------------------------------------
def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m medjax.generate", description=CLI_USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="a PathChat / LLaVA experiment (e.g. pathchat_stage2)")
    p.add_argument("--params", required=True,
                   help="a training workdir (its best-validation checkpoint if kept, else the latest) or a params dir")
    p.add_argument("--image", required=True, help="the image the question is about (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question, asked in the experiment's chat template")
    p.add_argument("--variant", default=None, help="config variant; default: the one in the workdir's config.json")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the experiment's eval.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return p


CLI_USAGE = """python -m medjax.generate --exp pathchat_stage2 --params DIR --image tile.png --prompt "..."
    [--variant V] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--set k=v ...]

Answers a question about an image with a trained PathChat / LLaVA checkpoint: the prompt in the experiment's chat
template (data.template; the tokenizer of the run's data.dir or data.tokenizer), the image preprocessed as in
training, a jit-compiled prefill then one compiled decode step per token against the KV cache (`TokenStream`),
each token's text written to stdout as it comes. Greedy by default; --temperature / --top-p sample. At the end
stderr gets the compile time, the time to first token and the decoding speed (tokens/s).
"""


def stream_text(tokenizer, tokens: Iterator[np.ndarray], out) -> list[int]:
    """Write the text of a one-row token stream to `out` as it grows (the whole decode each time, so multi-token
    characters and word spaces come out right; a trailing incomplete byte sequence waits); the EOS is not shown."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(int(token[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    return ids


@entry_point
def main(argv=None) -> int:
    import os
    import sys

    from medjax import config as config_lib
    from medjax.checkpoint import CheckpointError
    from medjax.evaluate import checkpoint_to_evaluate, restore_checked, saved_config
    from medjax.tasks import build_task

    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.image):
        raise MedjaxInputError(f"{args.image}: --image file not found")
    # the run's model and tokenizer (its workdir's config.json; {} for converted weights)
    config = config_lib.run_config(args.exp, saved_config(args.params), args.variant, args.overrides)
    if config.get("task") != "pathchat":
        raise MedjaxInputError(f"--exp {args.exp}: medjax.generate answers with PathChat / LLaVA experiments (task "
                               f"'pathchat'), this one's task is {config.get('task')!r}")
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731 - stdout is the answer only
    task = build_task(config, log=say)
    try:
        _, _, params = restore_checked(checkpoint_to_evaluate(args.params, log=say), config, task)  # best/ first
    except CheckpointError as err:
        say(f"error: {err}")
        return 2
    ids = task.prompt_ids(args.prompt, "--prompt")[None]
    pixels = task.pixels(args.image)[None]
    new_tokens = args.max_new_tokens if args.max_new_tokens is not None else int(config.eval.max_new_tokens)
    stream = TokenStream(task.model, {"params": jax.device_put(params)}, ids, pixel_values=pixels,
                         max_new_tokens=new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_token_id=task.tokenizer.eos_token_id, rng=jax.random.key(args.seed))
    times = []

    def timed():
        start = time.perf_counter()
        for token in stream:
            times.append(time.perf_counter() - start)
            yield token

    generated = stream_text(task.tokenizer, timed(), sys.stdout)
    print(flush=True)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    say(f"compiled prefill + decode step in {stream.compile_seconds:.1f}s; time to first token "
        f"{1e3 * times[0]:.1f} ms (prompt of {ids.shape[1]} tokens, {task.model.num_image_tokens} of them the "
        f"image); {len(generated)} tokens in {times[-1]:.3f}s, {decode:.1f} tokens/s decoding")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
