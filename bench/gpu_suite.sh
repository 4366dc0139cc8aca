#!/usr/bin/env bash
# The medjax GPU suite (issue 21): every item time-capped, at most ~7.5 minutes in all, JSON + markdown in
# ${OUT:-bench_out}. Run it from the repository root on a machine with a GPU:
#
#   bash bench/gpu_suite.sh                      # all items
#   bash bench/gpu_suite.sh --only relation_mask dynamic_head
#   bash bench/gpu_suite.sh --with-monai         # MONAI in the sliding-window item (needs a CUDA torch)
#   bash bench/gpu_suite.sh --dry-run            # check and plan only (any machine)
#
# Needs jax with CUDA (`pip install -U "jax[cuda12]"`) and this package (`pip install -e .`). For
# --with-monai, a CUDA build of torch: `pip install torch --index-url https://download.pytorch.org/whl/cu126`
# (or copy that wheel to the host beforehand if it has no network). Items: python -m medjax.bench gpu-suite --help.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not found"
exec python -m medjax.bench gpu-suite --out "${OUT:-bench_out}" "$@"
