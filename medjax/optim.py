"""Optimizer from config: AdamW with linear warmup + cosine decay and global-norm clipping (optax)."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
    warmup = int(optim_cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim_cfg.lr), warmup_steps=warmup,
        decay_steps=warmup + decay_steps, end_value=float(optim_cfg.lr) * float(optim_cfg.min_lr_ratio),
    )


def _decay_mask(params):
    """Weight decay on matrices/kernels only (ndim >= 2): no decay on biases, norms, 1-d embeddings."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if float(optim_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask,
    ))
    return optax.chain(*parts), schedule
