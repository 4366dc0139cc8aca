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


def report_encoder(model_cfg, tokenizer, dtype, tokenizer_source: str):
    """(BERT-family report encoder, its converted variables or None): from the local Hugging Face directory
    `model.init_text` (e.g. BioClinicalBERT, CXR-BERT; `medjax.convert.hf.load`), else a scratch BertEncoder of
    the `model.text_*` fields with the tokenizer's vocabulary (`model.vocab_size` 0). A tokenizer with more tokens
    than the encoder's vocabulary is refused."""
    from medjax.config import ConfigError
    from medjax.nn.bert import BertEncoder

    m = model_cfg
    if m.get("init_text", ""):
        from medjax.convert import hf

        text, variables = hf.load(m.init_text, dtype=dtype)
    else:
        text = BertEncoder(vocab_size=int(m.vocab_size) or len(tokenizer), width=m.text_width, depth=m.text_depth,
                           num_heads=m.text_heads, mlp_dim=m.text_mlp_dim, max_positions=m.max_positions,
                           add_pooling_layer=False, dtype=dtype)
        variables = None
    if len(tokenizer) > text.vocab_size:
        raise ConfigError(f"the tokenizer ({tokenizer_source}) has {len(tokenizer)} tokens, more than the text "
                          f"encoder's vocab_size={text.vocab_size} (model.vocab_size / model.init_text)")
    return text, variables
