"""python -m medjax.bench sliding_window [--exp universal_swin] [--variant V] [--size X Y Z] [--quick]

Whole-volume CT inference of the CLIP-Driven Universal Model (Liu et al., ICCV 2023): medjax's
`sliding_window_inference` (windows batched under one jit, accumulation on device) vs MONAI's
`sliding_window_inference` with the PyTorch original model (`medjax.convert.torch_universal`) on the
same random volume, window (the experiment's crop size, 96^3 in the paper), overlap, Gaussian
weighting and window batch (medjax on CPU runs `--cpu-batch-size` windows per call, its default 1, as
`sliding_window_inference` does). Random weights: when `medjax.convert.universal` can convert the PyTorch
model's state dict, both run the same weights and the table reports their largest logit difference;
otherwise each side has its own random weights (timing only).

Reported per implementation: the first call (compile + run for medjax), the median of --iters
timed calls after --warmup calls, and medjax's speed-up over MONAI. The timed calls alternate
between the implementations (medjax, MONAI, medjax, ...), so drift in a shared machine's speed
falls on both. torch here is the CPU build, so on an accelerator the ratio compares JAX on the
accelerator with PyTorch on the host's CPU cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from medjax.bench import _timing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench sliding_window", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="universal_swin", help="universal_swin or universal_unet")
    p.add_argument("--variant", default=None, help="config variant (default full; tiny with --quick)")
    p.add_argument("--size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="volume size (default 192 192 128; 80 64 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (both sides)")
    p.add_argument("--cpu-batch-size", type=int, default=1,
                   help="medjax's windows per forward pass on CPU (its default 1; 0 = --batch-size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--impl", choices=["both", "medjax", "monai"], default="both")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true",
                   help="tiny variant, 64^3 window (the PyTorch Swin UNETR needs >= 2 voxels at 1/32), 80x64x64 "
                        "volume (2 windows), batch 2, 1 timed call")
    return p


def _torch_model(config):
    """(PyTorch original model, (Flax model, variables) converted from its random weights or None, note)."""
    try:
        import torch

        from medjax.convert import torch_universal
    except ImportError as error:
        return None, None, f"no PyTorch model ({error})"
    m = config.model
    torch.manual_seed(int(config.seed))
    model = torch_universal.universal_torch(m.backbone, feature_size=int(m.feature_size),
                                            num_classes=int(m.num_classes), encoding=m.encoding,
                                            norm_groups=int(m.norm_groups), legacy_merging=bool(m.legacy_merging))
    model.eval()
    try:
        from medjax.convert import universal as convert_universal
        from medjax.dtypes import parse_dtype
    except ImportError:
        return model, None, "separate random weights (no converter)"
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    flax_model, variables, _ = convert_universal.convert_state_dict(
        state, m.backbone, source="random PyTorch weights", norm_groups=int(m.norm_groups),
        legacy_merging=bool(m.legacy_merging), kernel_impl=config.kernels.impl,
        dtype=parse_dtype(config.dtype, "dtype"))
    return model, (flax_model, variables), "same random weights (PyTorch -> converted)"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.variant = args.variant or "tiny"
        args.size = args.size or [80, 64, 64]
        args.batch_size = 2
        args.iters, args.warmup = min(args.iters, 1), min(args.warmup, 1)
        if not any(o.startswith("data.crop_size=") for o in args.overrides):
            args.overrides = [*args.overrides, "data.crop_size=(64, 64, 64)"]
    size = tuple(args.size or (192, 192, 128))

    import jax
    import jax.numpy as jnp

    from medjax import config as config_lib
    from medjax.inference.sliding_window import scan_interval, sliding_window_inference, window_starts
    from medjax.models import universal as universal_lib
    from medjax.tasks.base import model_config

    config = config_lib.get_config(args.exp, args.variant, args.overrides)
    window = tuple(int(s) for s in config.data.crop_size)
    padded = tuple(max(s, w) for s, w in zip(size, window))
    n_windows = len(window_starts(padded, window, scan_interval(padded, window, args.overlap)))
    volume = np.random.default_rng(0).random(size + (1,), dtype=np.float32)

    torch_model, converted, weights_note = (None, None, "random weights, medjax only")
    if args.impl != "medjax":
        torch_model, converted, weights_note = _torch_model(config)
    if converted is not None:
        model, variables = converted
    else:
        model = universal_lib.universal_from_config(model_config(config))
        variables = model.init(jax.random.key(int(config.seed)), jnp.zeros((1, *window, 1), jnp.float32))
    variables = jax.device_put(variables)
    device = jax.devices()[0]
    print(f"sliding_window: {args.exp} ({config.variant}), volume {size}, window {window}, overlap {args.overlap}, "
          f"Gaussian, {n_windows} windows in batches of {args.batch_size}"
          f"{f' (medjax on CPU: {args.cpu_batch_size})' if device.platform == 'cpu' and args.cpu_batch_size else ''}"
          f"; {weights_note}")
    headers = ("impl", "device", "first call s (compile + run)", "s / volume", "medjax speed-up",
               "max |logit diff|")
    print(_timing.markdown_table(headers, []), flush=True)

    runners = {}  # name -> (device column, run returning channels-last float32 logits; medjax's stay on device)
    if args.impl != "monai":
        def run():
            return jax.block_until_ready(sliding_window_inference(
                model.apply, volume, variables, window=window, overlap=args.overlap, mode="gaussian",
                batch_size=args.batch_size, cpu_batch_size=args.cpu_batch_size or None))

        runners["medjax"] = (f"{device.platform} ({device.device_kind})", run)
    if args.impl != "medjax":
        if torch_model is None:
            print(_timing.markdown_row(["monai", "n/a", "n/a", "n/a", "n/a", weights_note]))
        else:
            runners["monai + torch"] = _monai_runner(torch_model, volume, window, args)
    timings = _interleaved_timings({name: fn for name, (_, fn) in runners.items()}, args.warmup, args.iters)
    ours_s = timings["medjax"][1] if "medjax" in timings else None
    for name, (device_column, _) in runners.items():
        first, seconds, logits = timings[name]
        speedup = diff = ""
        if name != "medjax":
            speedup = _timing.ratio(seconds, ours_s) if ours_s else "n/a"
            same = "medjax" in timings and "same" in weights_note
            diff = f"{np.abs(np.asarray(logits) - np.asarray(timings['medjax'][2])).max():.2e}" if same else "n/a"
        print(_timing.markdown_row([name, device_column, f"{first:.2f}", f"{seconds:.3f}", speedup, diff]),
              flush=True)


def _monai_runner(torch_model, volume: np.ndarray, window, args):
    """(device column, run) for MONAI's sliding_window_inference with the PyTorch model on `volume`."""
    import torch
    from monai.inferers import sliding_window_inference as monai_sliding_window

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    x = torch.from_numpy(volume).permute(3, 0, 1, 2)[None].contiguous()

    def run_torch():
        with torch.no_grad():
            out = monai_sliding_window(x, window, args.batch_size, torch_model, overlap=args.overlap,
                                       mode="gaussian")
        return out[0].permute(1, 2, 3, 0).numpy()

    return f"cpu ({torch.get_num_threads()} threads)", run_torch


def _interleaved_timings(runs: dict, warmup: int, iters: int) -> dict:
    """name -> (first call s, median s of `iters` timed calls, first call's output). After the first calls and
    `warmup` untimed rounds, each round times every implementation once in turn, so a machine whose speed
    drifts slows both sides alike."""
    first, outputs, times = {}, {}, {name: [] for name in runs}
    for name, fn in runs.items():
        start = time.perf_counter()
        outputs[name] = fn()
        first[name] = time.perf_counter() - start
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for _ in range(max(iters, 1)):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (first[name], statistics.median(times[name]), outputs[name]) for name in runs}

if __name__ == "__main__":
    main()
