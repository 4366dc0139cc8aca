"""python -m medjax.bench llama_step [--width 4096 --depth 1 --heads 32 --mlp 11008 ...] [--quick]

One train step (next-token cross-entropy, backward, AdamW) of a Llama-7B-shaped decoder (`medjax.nn.llama`,
Touvron et al. 2023: width 4096, 32 heads, SwiGLU MLP 11008, RMSNorm, RoPE) of `--depth` blocks with its
embedding and LM head, on random tokens: compile time, median step seconds, XLA's FLOPs per step, MFU
against the device's peak (`medjax.parallel.peaks`) and the compiler's planned peak memory. The LM head's
matmul (vocab 32000) is in the FLOPs, as in a real step.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench llama_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = --heads (Llama 2 7B)")
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="compute dtype")
    p.add_argument("--remat", default="none", help="none | full | dots_saveable")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="toy sizes (width 64, 4 heads, MLP 128, seq 32, vocab 256)")
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.width, args.heads, args.mlp, args.seq, args.vocab, args.batch, args.steps = 64, 4, 128, 32, 256, 2, 2
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from medjax.bench import _timing
    from medjax.bench.step import flops_per_step
    from medjax.bench.step_pair import jax_side
    from medjax.nn.llama import Llama
    from medjax.parallel import peaks

    dtype = jnp.dtype(args.dtype)
    model = Llama(vocab_size=args.vocab, width=args.width, depth=args.depth, num_heads=args.heads,
                  num_kv_heads=args.kv_heads or None, mlp_dim=args.mlp, remat=args.remat, scan=False, dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), batch["inputs"][:1, :8])["params"]))()

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    start = time.perf_counter()
    side = jax_side(loss_fn, lambda p, b: model.apply({"params": p}, b["inputs"]), params, batch)
    compile_s = time.perf_counter() - start
    side.step()
    times = _timing.alternating_times({"medjax": side.step}, warmup=0, repeats=args.steps)["medjax"]
    seconds = _timing.TimeSummary.of(times)
    flops = flops_per_step(side.compiled)
    device = jax.devices()[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peaks.peak_flops(device.device_kind, args.dtype)
    utilisation = peaks.mfu(flops, seconds.median, peak) if flops else None
    memory = side.memory()
    print(f"llama_step: width {args.width}, depth {args.depth}, heads {args.heads}, MLP {args.mlp}, vocab "
          f"{args.vocab}, batch {args.batch} x {args.seq} tokens, {args.dtype}, remat {args.remat}, "
          f"{device.platform} ({device.device_kind}); params {side.params / 1e6:.1f}M")
    print(_timing.markdown_table(
        ("compile s", "step s median (min-max)", "tokens/s", "TFLOP/step", "MFU", "compiled peak"),
        [[f"{compile_s:.1f}", seconds.describe(), f"{args.batch * args.seq / seconds.median:.4g}",
          f"{flops / 1e12:.3f}" if flops else "n/a",
          f"{100 * utilisation:.1f}%" if utilisation is not None else "n/a (peak unknown)",
          _timing.mib(memory.get("compiled_peak_bytes"))]]), flush=True)
