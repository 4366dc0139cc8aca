"""Config blocks every experiment has (seed, train, optim, mesh, kernels, init)."""
from __future__ import annotations

import ml_collections

from medjax.optim import LAYER_DECAY_EMBED


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
        eval_every=0,  # > 0: run the task's validation every this many steps (and at the end), logged as val/...
        # the best-validation checkpoint (<workdir>/best, medjax.best_checkpoint; evaluate reads it): a metric of
        # the task's validation ("" = the task's declared one, if any) and "max" | "min" ("" = the task's, or max)
        select_metric="",
        select_mode="",
    ))
    # medjax.optim's one schema for every family (its module doc says what each key does).
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1.5e-4, lr_scaling="none", lr_reference_batch=256,
        schedule="cosine", warmup_steps=100, warmup_fraction=0.0, warmup_linspace=False, min_lr=0.0, min_lr_ratio=0.0,
        weight_decay=0.05, weight_decay_end=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, clip_depth=0,
        lr_mults=[], wd_mults=[],  # (regex, multiplier) on "/"-joined param paths; wd_mults [] = ndim >= 2 decayed
        frozen=[], frozen_early=[], frozen_early_steps=0,
        layer_decay=1.0, layer_decay_scope="", layer_decay_embed=LAYER_DECAY_EMBED,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp", num_devices=0))  # 0 = all devices
    c.kernels = ml_collections.ConfigDict(dict(impl="auto"))  # "auto" | "reference" | "pallas"
    # Every family's data block starts with these (experiments add theirs with c.data.update(...)):
    c.data = ml_collections.ConfigDict(dict(
        verify="full",  # start-up check of every data file: full (decode) | headers | none (medjax.data.verify)
        on_bad_example="error",  # a file failing mid-run: error (stop, naming it) | skip (deterministic replacement)
    ))
    return c
