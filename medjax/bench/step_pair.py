"""One train step of the same model in medjax and in PyTorch, as two interchangeable `StepSide`s
(`python -m medjax.bench vs-torch`).

Both sides run the same step: forward, loss, backward and an AdamW update (torch.optim.AdamW and
optax.adamw with the same lr, betas, eps and decoupled weight decay), on the same batch, in float32.
`forward()` returns the model's outputs in eval mode as numpy, in one layout for both, so that the two
can be compared before timing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-5)  # the Universal Model's torch AdamW


@dataclasses.dataclass
class StepSide:
    """One implementation's step: `step()` runs one train step to completion (blocking) and returns the
    loss; `forward()` the eval-mode outputs; `memory()` what the compiler planned (medjax) or {}."""

    name: str
    step: Callable[[], float]
    forward: Callable[[], np.ndarray]
    memory: Callable[[], dict] = dict
    params: int = 0
    compiled: Any = None  # medjax: the compiled train step (for XLA's cost analysis)


def jax_side(loss_fn: Callable[[Any, Any], Any], forward_fn: Callable[[Any, Any], Any], params: Any, batch: Any,
             *, adamw: dict = ADAMW) -> StepSide:
    """A medjax step: `loss_fn(params, batch)` -> scalar, its gradient and optax.adamw, jitted with the params
    and optimizer state donated; `forward_fn(params, batch)` -> outputs (eval mode)."""
    import jax
    import optax

    from medjax.bench import _timing

    tx = optax.adamw(adamw["lr"], b1=adamw["b1"], b2=adamw["b2"], eps=adamw["eps"],
                     weight_decay=adamw["weight_decay"])
    params = jax.device_put(params)
    batch = jax.device_put(batch)
    opt_state = jax.jit(tx.init)(params)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    state = {"params": params, "opt_state": opt_state}
    forward = jax.jit(forward_fn)

    def step() -> float:
        state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], batch)
        return float(loss)

    def memory() -> dict:
        plan = _timing.memory_of(compiled)
        return {} if plan is None else {"compiled_peak_bytes": plan.peak_bytes, "temp_bytes": plan.temp_bytes,
                                        "argument_bytes": plan.argument_bytes}

    # forward() reads the current weights: call it before step() to compare the initial (shared) weights
    return StepSide("medjax", step, lambda: np.asarray(forward(state["params"], batch), np.float32), memory,
                    params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), compiled=compiled)


def torch_side(module, loss_fn: Callable[[Any], Any], forward_fn: Callable[[Any], Any], *,
               adamw: dict = ADAMW) -> StepSide:
    """A PyTorch step: `loss_fn(module)` -> scalar tensor, backward, torch.optim.AdamW.step();
    `forward_fn(module)` -> numpy outputs (called under no_grad in eval mode, then train mode again)."""
    import torch

    optimizer = torch.optim.AdamW(module.parameters(), lr=adamw["lr"], betas=(adamw["b1"], adamw["b2"]),
                                  eps=adamw["eps"], weight_decay=adamw["weight_decay"])

    def step() -> float:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def forward() -> np.ndarray:
        module.eval()
        with torch.no_grad():
            out = forward_fn(module)
        module.train()
        return np.asarray(out, np.float32)

    return StepSide("torch", step, forward, params=sum(p.numel() for p in module.parameters()))


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| of two outputs of the same shape (a clear error naming both shapes otherwise)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"medjax/bench/step_pair.py: outputs differ in shape: medjax {a.shape}, torch {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0
