"""Peak dense matmul FLOP/s of one JAX device, by `device.device_kind`, for MFU.

MFU = (FLOPs of one step of the per-device program, from XLA's cost analysis) / step time /
the device's peak. Peaks are the vendors' dense (no sparsity) tensor-core / MXU figures per JAX
device. "fp32" is the rate of a float32 matmul at JAX's default precision: on TPU one bf16 MXU
pass, on Ampere and newer NVIDIA GPUs TF32 tensor cores; on V100 the FP32 CUDA cores.

On TPU v2/v3 a JAX device is one TensorCore (half a chip); from v4 on it is one chip.
Sources: Google Cloud TPU system-architecture pages (per-chip bf16 peaks) and NVIDIA datasheets.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Peak:
    bf16: float | None  # FLOP/s; None: no native bf16 matmul
    fp32: float | None


_T = 1e12
# (a word of device_kind, lower case; Peak). First match wins, so specific names come first;
# a key matches whole words only ("a10" does not match "A100" or "A10G").
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("tpu v2", Peak(22.5 * _T, 22.5 * _T)),  # 45 TFLOP/s per chip, 2 cores
    ("tpu v3", Peak(61.5 * _T, 61.5 * _T)),  # 123 per chip, 2 cores
    ("tpu v4", Peak(275 * _T, 275 * _T)),
    ("tpu v5 lite", Peak(197 * _T, 197 * _T)),  # v5e
    ("tpu v5e", Peak(197 * _T, 197 * _T)),
    ("tpu v5p", Peak(459 * _T, 459 * _T)),
    ("tpu v5", Peak(459 * _T, 459 * _T)),  # v5p reports "TPU v5"
    ("tpu v6 lite", Peak(918 * _T, 918 * _T)),  # v6e (Trillium)
    ("tpu v6e", Peak(918 * _T, 918 * _T)),
    ("h100 pcie", Peak(756 * _T, 378 * _T)),
    ("h100 nvl", Peak(835 * _T, 418 * _T)),
    ("h100", Peak(989.4 * _T, 494.7 * _T)),  # SXM5
    ("h200", Peak(989.4 * _T, 494.7 * _T)),
    ("gh200", Peak(989.4 * _T, 494.7 * _T)),
    ("a100", Peak(312 * _T, 156 * _T)),
    ("l40s", Peak(362 * _T, 183 * _T)),
    ("l40", Peak(181 * _T, 90.5 * _T)),
    ("l4", Peak(121 * _T, 60 * _T)),
    ("a10", Peak(125 * _T, 62.5 * _T)),  # A10 (not the A10G)
    ("v100", Peak(None, 15.7 * _T)),  # SXM2; no bf16 tensor cores
)


def device_peak(device_kind: str) -> Peak | None:
    """The peak of a device kind (e.g. "TPU v4", "NVIDIA H100 80GB HBM3"), None when unknown."""
    kind = device_kind.lower()
    for key, peak in PEAKS:
        if re.search(r"(?<![0-9a-z])" + re.escape(key) + r"(?![0-9a-z])", kind):
            return peak
    return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device for matmuls in `dtype` ("bfloat16" or "float32"); None when unknown."""
    peak = device_peak(device_kind)
    if peak is None:
        return None
    if dtype in ("bfloat16", "bf16"):
        return peak.bf16
    if dtype in ("float32", "fp32"):
        return peak.fp32
    return None


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOP utilisation of one device: achieved FLOP/s over the peak (None when the peak is unknown)."""
    if peak is None or not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak
