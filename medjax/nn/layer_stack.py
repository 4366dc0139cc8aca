"""The layer stack of medjax's Transformers: `depth` `medjax.nn.transformer.TransformerBlock`s either unrolled
or under one `nn.scan`, each with an `nn.remat` policy (gradient checkpointing, Chen et al. 2016).

- `block_stack` / `run_stack`: unrolled, submodules `blocks_0`, `blocks_1`, ...; scanned, one `nn.scan` over the
  layers (submodule `blocks`, every param with a leading layer axis of logical name "layers",
  `medjax.nn.transformer_layout.LAYERS`), so a 24-layer ViT compiles one block. Per-layer values (the drop-path
  schedule) are scanned inputs; intermediate layer outputs are the scan's outputs.
- `resolve_scan` / `resolve_remat`: a model's `scan` / `remat` fields (bools, names, or config text) to the
  stack's switches; `REMAT_POLICIES` names what the backward pass keeps.

The params of the two layouts convert with `medjax.nn.transformer_layout` (`stack_layers`, `unstack_layers`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.nn.transformer import TransformerBlock
from medjax.nn.transformer_layout import LAYERS

__all__ = ["REMAT_POLICIES", "SCAN_MIN_DEPTH", "block_stack", "resolve_remat", "resolve_scan", "run_stack"]

SCAN_MIN_DEPTH = 12  # scan=None (auto) scans stacks of at least this many layers

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_remat(remat: bool | str | None) -> str:
    """A model's `remat` field -> "none" | a REMAT_POLICIES name; True (the old bool switch) is "full"."""
    if remat is None or remat is False:
        return "none"
    if remat is True:
        return "full"
    name = str(remat).strip().lower()
    name = {"true": "full", "false": "none", "1": "full", "0": "none", "": "none"}.get(name, name)
    if name != "none" and name not in REMAT_POLICIES:
        raise ValueError(f"medjax/nn/layer_stack.py: remat={remat!r}; expected 'none', "
                         f"{', '.join(repr(k) for k in REMAT_POLICIES)} (or a bool: True = 'full')")
    return name


def resolve_scan(scan: bool | str | None, depth: int) -> bool:
    """A model's `scan` field -> bool: None / "auto" scans stacks of >= SCAN_MIN_DEPTH layers; "true" /
    "false" (a config override of a None field arrives as text) are accepted."""
    if scan is None or (isinstance(scan, str) and scan.strip().lower() in ("auto", "none", "")):
        return depth >= SCAN_MIN_DEPTH
    if isinstance(scan, str):
        lowered = scan.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"medjax/nn/layer_stack.py: scan={scan!r}; expected True, False or None (auto)")
        return lowered in ("true", "1", "yes")
    return bool(scan)


class _StackBlock(TransformerBlock):
    """A block of a stack: (x, drop_path_rate, mask, train, collect) -> (x, x if collect), the shape nn.scan
    needs (carry, per-layer input) -> (carry, per-layer output); `train`/`collect` are static."""

    def __call__(self, x, drop_path_rate, mask, train, collect, relation_mask_ratio=None):  # type: ignore[override]
        x = super().__call__(x, mask=mask, train=train, drop_path_rate=drop_path_rate,
                             relation_mask_ratio=relation_mask_ratio)
        return x, (x if collect else None)


def _remat(cls, policy: str, *, prevent_cse: bool, static_argnums: tuple[int, ...]):
    """`train`, `collect` (and, unrolled, the per-call relation-mask ratio) are static; argnum 0 is self."""
    if policy == "none":
        return cls
    return nn.remat(cls, static_argnums=static_argnums, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def block_stack(depth: int, rates: Sequence[float], *, scan: bool, remat: str, **block_fields):
    """The stack's modules, to assign in a `setup` (attribute `blocks`): unrolled, a list of `depth` blocks
    (names blocks_0, ...; block i has drop path rates[i]); scanned, one `nn.scan` module over `depth` blocks
    whose params carry a leading layer axis ("layers"). Run it with `run_stack`."""
    if len(rates) != depth:
        raise ValueError(f"medjax/nn/layer_stack.py block_stack: {len(rates)} drop-path rates for {depth} layers")
    if not scan:
        block = _remat(_StackBlock, remat, prevent_cse=True, static_argnums=(4, 5, 6))
        return [block(drop_path=float(rate), **block_fields) for rate in rates]
    block = _remat(_StackBlock, remat, prevent_cse=False, static_argnums=(4, 5))  # scan already keeps the recomputation apart
    scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=depth,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
    uniform = len(set(float(r) for r in rates)) <= 1
    return scanned(drop_path=float(rates[0]) if uniform and depth else 0.0, **block_fields)


def run_stack(blocks, x: jax.Array, rates: Sequence[float], *, mask: jax.Array | None = None, train: bool = False,
              collect: bool = False, relation_mask_ratios: Sequence[float] | None = None
              ) -> tuple[jax.Array, jax.Array | None]:
    """x through a `block_stack`; also every block's output stacked (depth, ...) when `collect`. A scanned
    stack with a non-uniform drop-path schedule gets the rates as its scanned input (so no per-layer value
    forces the unrolled path). `relation_mask_ratios`: a per-layer MRM ratio for this pass (unrolled stacks
    only: a scanned stack runs one program for every layer)."""
    if isinstance(blocks, (list, tuple)):
        ratios = [None] * len(blocks) if relation_mask_ratios is None else list(relation_mask_ratios)
        if len(ratios) != len(blocks):
            raise ValueError(f"medjax/nn/layer_stack.py run_stack: {len(ratios)} relation_mask_ratios for "
                             f"{len(blocks)} layers")
        outputs = []
        for block, ratio in zip(blocks, ratios):
            x, _ = block(x, None, mask, train, False, ratio)
            outputs.append(x)
        return x, (jnp.stack(outputs) if collect and outputs else None)
    if relation_mask_ratios is not None and any(relation_mask_ratios):
        raise ValueError("medjax/nn/layer_stack.py run_stack: per-layer relation masking needs an unrolled stack "
                         "(scan=False; e.g. model.scan=false with MRM's model.mask_layers)")
    uniform = len(set(float(r) for r in rates)) <= 1
    per_layer = None if uniform else jnp.asarray(np.asarray(rates, np.float32))
    return blocks(x, per_layer, mask, train, collect)
