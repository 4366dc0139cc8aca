"""Config blocks every experiment has (seed, train, optim, mesh, kernels, init)."""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    c.init = ""  # a pretraining workdir (or converted weights) to start from; a workdir checkpoint wins
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=64,  # the GLOBAL batch over all processes and devices
        grad_accum=1,  # microbatches per optimizer step (batch_size must divide by it)
        log_every=10,
        checkpoint_every=500,
        keep_checkpoints=3,
        stop_at=0,  # stop (with a checkpoint) at this step, schedule still spanning `steps`; 0 = run to `steps`
        eval_batch_size=64,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1.5e-4, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp", num_devices=0))  # 0 = all devices
    c.kernels = ml_collections.ConfigDict(dict(impl="auto"))  # "auto" | "reference" | "pallas"
    return c
