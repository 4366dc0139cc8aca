"""MRM transfer: APTOS 2019 diabetic-retinopathy grading (5 grades as cumulative ordinal
multi-label, BCE) by fine-tuning the MRM-pretrained image encoder (Yang et al., ICCV 2023, Tab. 1).

    python -m medjax.train --exp mrm_aptos --set init=runs/mrm --set data.label_fraction=0.01
    python -m medjax.evaluate --exp mrm_aptos --checkpoint runs/aptos_1pct

Label fractions 1% / 10% / 100% of the training split as in the paper; 60/20/20 split, seed 42
(the authors' loader). The encoder must match the pretraining run's `model` block.
"""
from __future__ import annotations

import ml_collections

from experiments import mrm_retina
from experiments._common import base_config



def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    pretrain = mrm_retina.get_config(variant)
    c = base_config()
    c.task = "fundus_classification"
    c.variant = variant
    c.data.update(dict(
        allow_duplicates=False,  # True: keep repeated manifest rows / participant+eye (with a warning)
        dir="",  # <dir>/manifest.csv with `label` = grade 0..4; "" = the demo's aptos/ set
        kind="fundus_genome",
        demo_subdir="aptos",
        label_fraction=1.0,  # 0.01 / 0.1 / 1.0 in the paper's table
        label_seed=42,
        train_split="train", val_split="val", eval_split="test",  # val: train.eval_every / the best checkpoint
        rotation=0.0, hflip=True,  # ContIG's APTOS loader: horizontal flip only
    ))
    enc = pretrain.model
    c.model = ml_collections.ConfigDict(dict(
        image_size=enc.image_size, patch_size=enc.patch_size, width=enc.width, depth=enc.depth,
        num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, drop_path=0.1,
        num_classes=5, head="ordinal",  # ContIG: 5 cumulative outputs, grade g -> [1]*(g+1) + [0]*(4-g)
        pooling="mean",
        remat="none",  # encoder blocks: "none" | "full" | "dots_saveable" (recompute in backward)
        scan=None,  # nn.scan the encoder's blocks; None: when depth >= 12 (params under blocks/)
    ))
    # Fine-tuning: MAE's recipe scaled down (AdamW, cosine, warmup).
    c.train.update(dict(steps=3000, batch_size=64, log_every=50, checkpoint_every=1000, eval_batch_size=64))
    c.optim.update(dict(lr=5e-4, warmup_steps=150, weight_decay=0.05, b2=0.999))
    if variant == "demo":
        c.train.update(dict(steps=150, batch_size=32, log_every=10, checkpoint_every=50, eval_batch_size=32))
        c.optim.update(dict(lr=1e-3, warmup_steps=10))
    elif variant == "tiny":
        c.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8))
        c.optim.update(dict(lr=1e-3, warmup_steps=1))
    return c
