"""python -m medjax.bench dynamic_conv3d [--sizes S ...] [--classes C] [--batch B] [--quick]

The Universal Model's dynamic head (text-based controller, Sec. 3): the Pallas kernel vs its
jnp reference on features (batch, S, S, S, 8) and controller params (batch, classes, 153),
forward and forward+backward (grad of sum(logits) w.r.t. features and params): median time, the
compiler's peak memory, their ratios and the kernel's relative L2 error against the reference.
Defaults follow issue 4: 32 classes, 64^3 and 96^3, batch 2 (target on GPU: kernel peak memory
<= 1/8 of the reference's). On CPU the kernel runs in interpret mode: only the reference is
timed; the kernel is run once for the error and memory columns (up to --check-max-voxels).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from medjax.bench import _timing
from medjax.kernels import _pallas_util
from medjax.kernels.dynamic_conv3d import PARAMS_PER_CLASS, dynamic_head


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench dynamic_conv3d", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cube side S of the (S, S, S) volume")
    p.add_argument("--classes", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--impl", choices=["both", "pallas", "reference"], default="both")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="features dtype")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-max-voxels", type=int, default=32**3,
                   help="on CPU, run the interpret-mode kernel only up to this many voxels per sample")
    p.add_argument("--quick", action="store_true", help="small sizes (8^3 and 16^3, 8 classes, batch 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.sizes, args.classes, args.batch = [8, 16], 8, 1
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    backend = _pallas_util.current_backend()
    compiled_kernel = backend in ("gpu", "tpu")
    device = jax.devices()[0]
    print(f"dynamic_conv3d: batch {args.batch}, classes {args.classes}, {args.dtype} features, "
          f"{device.platform} ({device.device_kind}), median of {args.iters}")
    if not compiled_kernel:
        print("note: no GPU/TPU, so the Pallas kernel runs in interpret mode: it is not timed, its peak is the "
              "interpreter program's (not a GPU kernel's), and 'rel. L2 error' compares it with the reference.")
    print(_timing.markdown_table(("volume", "pass", *_timing.COMPARISON_HEADERS), []), flush=True)
    for size in args.sizes:
        keys = jax.random.split(jax.random.key(size), 2)
        features = jax.random.normal(keys[0], (args.batch, size, size, size, 8), jnp.dtype(args.dtype))
        params = jax.random.normal(keys[1], (args.batch, args.classes, PARAMS_PER_CLASS), jnp.float32) * 0.3
        run_kernel = args.impl != "reference" and (compiled_kernel or size**3 <= args.check_max_voxels)

        def forward(features, params, impl):
            return dynamic_head(features, params, impl=impl)

        def forward_backward(features, params, impl):
            loss = lambda x, p: jnp.sum(forward(x, p, impl).astype(jnp.float32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1))(features, params)

        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            cells = _timing.comparison_cells(
                lambda x, p, fn=fn: fn(x, p, "reference"), lambda x, p, fn=fn: fn(x, p, "pallas"),
                features, params, run_reference=args.impl != "pallas", run_kernel=run_kernel,
                time_kernel=compiled_kernel, warmup=args.warmup, iters=args.iters)
            print(_timing.markdown_row([f"{size}^3", name, *cells]), flush=True)


if __name__ == "__main__":
    main()
