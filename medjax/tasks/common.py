"""Helpers every task family shares: where the data is, a view on a subset of a dataset's rows, and the
label-fraction column label of label-efficiency tables."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medjax.data import demo as demo_lib


def data_root(data_cfg, log=print) -> str:
    """`data.dir`, or the demo dataset of `data.kind` (made once in the cache), optionally its
    `data.demo_subdir`."""
    if data_cfg.dir:
        return data_cfg.dir
    root = demo_lib.ensure_demo(data_cfg.kind, log=log)
    sub = data_cfg.get("demo_subdir", "")
    return f"{root}/{sub}" if sub else root


class Subset:
    """Rows `indices` of `base` (a random-access dataset), in that order; `num_labels` passes through."""

    def __init__(self, base: Any, indices: Sequence[int]):
        self.base, self.indices = base, np.asarray(indices)
        self.num_labels = getattr(base, "num_labels", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def describe(self, i: int) -> str:
        """The base's description of row i (medjax.data.pipelines.bad_examples)."""
        from medjax.data.pipelines.bad_examples import describe

        return describe(self.base, int(self.indices[i]))

def label_fraction_label(saved_config: dict) -> str | None:
    """"10%" for a run saved with `data.label_fraction` 0.1 (the label-efficiency columns of e.g. MRM Tab. 1
    and PTUnifier's classification table); None when its saved config has no label fraction."""
    fraction = saved_config.get("data", {}).get("label_fraction")
    return f"{fraction * 100:g}%" if fraction is not None else None
