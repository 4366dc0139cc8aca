"""python -m medjax.bench NAME [args]: benchmarks; `python -m medjax.bench NAME --help` for each.

  step            one experiment's train step: compile time, steps/s, examples/s, memory
  relation_mask   Pallas relation-masking attention vs its jnp reference
  dynamic_conv3d  Pallas dynamic head vs its jnp reference
  sliding_window  Universal Model CT sliding-window inference vs MONAI + PyTorch
  vs-torch        one experiment's train step in medjax vs its PyTorch original (same weights), alternating
  llama_step      a Llama-7B-shaped decoder's train step: FLOPs, MFU, compiled memory
  gpu_suite       the whole GPU suite (time-capped items, JSON + markdown); --dry-run plans it anywhere
  memory          one experiment's train-step memory plan (compile only, abstract shapes), largest buffers
  generate        PathChat / LLaVA generation: time to first token, tokens/s (KV cache)
"""
from __future__ import annotations

import importlib
import sys

from medjax.cli import entry_point

BENCHES = {
    "step": "medjax.bench.step",
    "relation_mask": "medjax.bench.relation_mask",
    "dynamic_conv3d": "medjax.bench.dynamic_conv3d",
    "sliding_window": "medjax.bench.sliding_window",
    "memory": "medjax.bench.memory",
    "vs_torch": "medjax.bench.vs_torch",
    "llama_step": "medjax.bench.llama_step",
    "gpu_suite": "medjax.bench.gpu_suite",
    "generate": "medjax.bench.generate",
}


@entry_point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in BENCHES:
        print(f"error: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    importlib.import_module(BENCHES[name]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
