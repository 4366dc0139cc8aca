"""python -m medjax.bench relation_mask [--tokens N ...] [--ratios R ...] [--quick]

MRM relation-masking attention (Sec. 3.2.1): the Pallas kernel vs its jnp reference, forward
and forward+backward (grad of sum(out) w.r.t. q, k, v): median time, the compiler's peak
memory, their ratios and the kernel's relative L2 error against the reference. Defaults follow
issue 4: tokens 256..4096, 12 heads, head_dim 64, ratios 0.25 and 0.5 (target on GPU: >= 2x
faster than the reference from 1024 tokens, memory linear in tokens). On CPU the kernel runs in
interpret mode: only the reference is timed; the kernel is run once for the error and memory
columns (up to --check-max-tokens).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from medjax.bench import _timing
from medjax.kernels import _pallas_util
from medjax.kernels.relation_mask import masked_count, relation_mask_attention


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench relation_mask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--kv-tokens", type=int, default=None, help="keys per sample (cross attention); default = tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--impl", choices=["both", "pallas", "reference"], default="both")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-max-tokens", type=int, default=512,
                   help="on CPU, run the interpret-mode kernel only up to this many tokens")
    p.add_argument("--quick", action="store_true", help="small sizes (tokens 64 128, 2 heads, head_dim 16)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.tokens, args.heads, args.head_dim = [64, 128], 2, 16
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    backend = _pallas_util.current_backend()
    compiled_kernel = backend in ("gpu", "tpu")
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"relation_mask: batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, {args.dtype}, "
          f"{device.platform} ({device.device_kind}), median of {args.iters}")
    if not compiled_kernel:
        print("note: no GPU/TPU, so the Pallas kernel runs in interpret mode: it is not timed, its peak is the "
              "interpreter program's (not a GPU kernel's), and 'rel. L2 error' compares it with the reference.")
    print(_timing.markdown_table(("tokens", "kv tokens", "ratio", "k", "pass", *_timing.COMPARISON_HEADERS), []),
          flush=True)
    for tokens in args.tokens:
        kv_tokens = args.kv_tokens or tokens
        keys = jax.random.split(jax.random.key(tokens), 3)
        q = jax.random.normal(keys[0], (args.batch, tokens, args.heads, args.head_dim), dtype)
        k = jax.random.normal(keys[1], (args.batch, kv_tokens, args.heads, args.head_dim), dtype)
        v = jax.random.normal(keys[2], (args.batch, kv_tokens, args.heads, args.head_dim), dtype)
        run_kernel = args.impl != "reference" and (compiled_kernel or tokens <= args.check_max_tokens)
        for ratio in args.ratios:
            def forward(q, k, v, impl):
                return relation_mask_attention(q, k, v, ratio=ratio, impl=impl)

            def forward_backward(q, k, v, impl):
                loss = lambda *qkv: jnp.sum(forward(*qkv, impl).astype(jnp.float32))  # noqa: E731
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                cells = _timing.comparison_cells(
                    lambda q, k, v, fn=fn: fn(q, k, v, "reference"), lambda q, k, v, fn=fn: fn(q, k, v, "pallas"),
                    q, k, v, run_reference=args.impl != "pallas", run_kernel=run_kernel,
                    time_kernel=compiled_kernel, warmup=args.warmup, iters=args.iters)
                print(_timing.markdown_row([tokens, kv_tokens, ratio, masked_count(ratio, kv_tokens), name, *cells]),
                      flush=True)


if __name__ == "__main__":
    main()
