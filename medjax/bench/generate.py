"""python -m medjax.bench generate --exp pathchat_stage2 [--variant tiny] [--batch-size 1] [--prompt-tokens P]
    [--new-tokens N] [--repeats R] [--params DIR] [--set k=v ...]

Generation speed of a PathChat / LLaVA experiment's model on the current device (random weights of the variant
unless --params names a checkpoint; the speed does not depend on the values): a prompt of P tokens (BOS, the
image's `num_image_tokens` tokens, random text) and one image per row, N new tokens, no EOS (every row runs to N).

- streaming (`medjax.generate.TokenStream`: one compiled prefill, one compiled decode step per token, each token
  brought to the host): compile time, time to first token (the prefill and the first choice; median over
  --repeats), decoding tokens/s per row after the first token;
- one program (`medjax.generate.generate`: prefill + `lax.while_loop`): its first call (compile + run), then new
  tokens/s over the batch (median);
- the KV cache's size and the params count.
"""
from __future__ import annotations

import argparse
import statistics
import time


def random_prompt(task, batch: int, prompt_tokens: int, seed: int = 0):
    """(input_ids (batch, P) int32, pixel_values (batch, S, S, 3) float32): BOS, the image tokens, random text ids
    from the tokenizer's ordinary tokens, and random normalised pixels."""
    import numpy as np

    images = task.model.num_image_tokens
    if prompt_tokens < images + 2:
        raise SystemExit(f"error: --prompt-tokens {prompt_tokens}: needs at least {images + 2} (BOS, the "
                         f"{images} image tokens and one text token)")
    rng = np.random.default_rng(seed)
    special = set(task.tokenizer.all_special_ids) | {task.image_token_id}
    ordinary = np.asarray([i for i in range(len(task.tokenizer)) if i not in special], np.int32)
    ids = rng.choice(ordinary, size=(batch, prompt_tokens)).astype(np.int32)
    ids[:, 0] = task.tokenizer.bos_token_id
    ids[:, 1:1 + images] = task.image_token_id
    size = task.image_size
    return ids, rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def measure(task, variables, ids, pixels, new_tokens: int, repeats: int) -> dict:
    """The streaming and one-program figures of the module docstring, in seconds and tokens/s."""
    import jax
    import numpy as np

    from medjax.generate import TokenStream, generate

    stream = TokenStream(task.model, variables, ids, pixel_values=pixels, max_new_tokens=new_tokens)
    first, decode = [], []
    for _ in range(repeats + 1):  # the first pass warms up (allocations, caches); not counted
        start = time.perf_counter()
        stamps = []
        for _token in stream:
            stamps.append(time.perf_counter() - start)
        first.append(stamps[0])
        if len(stamps) > 1:
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    start = time.perf_counter()
    jax.block_until_ready(generate(task.model, variables, ids, pixel_values=pixels, max_new_tokens=new_tokens))
    program_compile = time.perf_counter() - start
    program = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(task.model, variables, ids, pixel_values=pixels,
                                             max_new_tokens=new_tokens))
        program.append(time.perf_counter() - start)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    cache = jax.eval_shape(lambda: task.model.init_cache(ids.shape[0], ids.shape[1] + new_tokens))
    return {"compile_s": stream.compile_seconds, "program_compile_s": program_compile,
            "ttft_s": statistics.median(first[1:]),
            "decode_tokens_per_s": statistics.median(decode[1:]) if len(decode) > 1 else float("nan"),
            "program_tokens_per_s": ids.shape[0] * new_tokens / statistics.median(program),
            "cache_mib": sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2**20,
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medjax.bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="pathchat_stage2", help="a PathChat / LLaVA experiment (task 'pathchat')")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default: image tokens + 32)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up pass")
    p.add_argument("--params", default=None, help="a checkpoint to load instead of random weights")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise SystemExit("error: --batch-size, --new-tokens and --repeats must be >= 1")
    import flax.linen as nn
    import jax

    from medjax import config as config_lib
    from medjax.tasks import build_task

    config = config_lib.get_config(args.exp, args.variant, args.overrides)
    if config.get("task") != "pathchat":
        raise SystemExit(f"error: --exp {args.exp}: bench generate times PathChat / LLaVA experiments (task "
                         f"'pathchat'), this one's task is {config.get('task')!r}")
    task = build_task(config, log=lambda *_: None)
    if args.params:
        from medjax.evaluate import restore_checked

        params = jax.device_put(restore_checked(args.params, config, task)[2])
    else:
        params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    prompt = args.prompt_tokens or task.model.num_image_tokens + 32
    ids, pixels = random_prompt(task, args.batch_size, prompt)
    r = measure(task, {"params": params}, ids, pixels, args.new_tokens, args.repeats)
    device = jax.devices()[0]
    print("| exp | variant | device | params | batch | prompt | new | stream compile s | first generate() s | TTFT ms "
          "| decode tok/s/row | program tok/s | KV cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.exp} | {config.variant} | {jax.device_count()} x {device.device_kind} | {r['params'] / 1e6:.2f}M "
          f"| {args.batch_size} | {prompt} | {args.new_tokens} | {r['compile_s']:.1f} | {r['program_compile_s']:.1f} "
          f"| {1e3 * r['ttft_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['program_tokens_per_s']:.1f} "
          f"| {r['cache_mib']:.1f} |", flush=True)
