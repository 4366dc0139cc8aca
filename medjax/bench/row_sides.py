"""What a `python -m medjax.bench vs-torch` row builder returns (`medjax.bench.torch_rows`), and the torch import
every builder shares (all the host's cores for PyTorch's intra-op threads, as XLA:CPU uses them)."""
from __future__ import annotations

import dataclasses
import os

from medjax.bench.step_pair import StepSide


@dataclasses.dataclass
class RowSides:
    """The sides built for one row, a description of the shapes, and how the weights were shared."""

    sides: dict[str, StepSide]
    shapes: str
    weights: str


def torch_with_threads():
    """`torch`, with one intra-op thread per CPU core."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch
