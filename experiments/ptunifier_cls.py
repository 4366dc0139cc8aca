"""PTUnifier vision-only multi-label classification: the image with textual prompts in place of the
report, BCE, macro AUROC and F1 at 1% / 10% / 100% of the training labels (Chen et al., ICCV 2023,
classification table; the released `task_finetune_mlc_*` configs).

    python -m medjax.train --exp ptunifier_cls --set init=runs/ptunifier --set data.label_fraction=0.01
    python -m medjax.evaluate --exp ptunifier_cls --checkpoint runs/cls_1pct runs/cls_10pct runs/cls_100pct

Variants: "full" = CheXpert, 5 labels (batch 16, 1 epoch: 12,000 steps approximates one epoch of
CheXpert's ~190k frontal training images after the original's split), "rsna" = RSNA pneumonia, 1 label
(batch 16, 3 epochs: 3,500 steps approximates them for a ~18.7k-image training split); set train.steps
to epochs x your training images / 16 for exact epochs. `DIR` holds the original's
`mlc_<name>_{train,val,test}.arrow` (labels in column `chexpert` / `pnsa_pneumonia`). "demo", "tiny":
the demo's classification.jsonl (5 shape labels). Heads at lr x50, multi-modal modules x10. Scale
train.steps with data.label_fraction (the originals train on 1% / 10% files for the same epochs).
"""
from __future__ import annotations

from experiments._ptunifier_finetune import finetune_config

DATASETS = {  # variant: (file, label column, steps, epochs)
    "full": ("mlc_chexpert_{split}.arrow", "chexpert", 12000, 1),
    "rsna": ("mlc_psna_pneumonia_{split}.arrow", "pnsa_pneumonia", 3500, 3),
}


def get_config(variant: str = "full"):
    if variant not in DATASETS and variant not in ("demo", "tiny"):
        raise ValueError(f"ptunifier_cls: unknown variant {variant!r}; choose {', '.join(DATASETS)}, demo or tiny")
    file, column, steps, epochs = DATASETS.get(variant, DATASETS["full"])
    c = finetune_config(variant, "ptunifier_classification", file=file, demo_file="classification.jsonl",
                        max_text_len=32, batch_size=16, steps=steps, head_multiplier=50, multi_modal_multiplier=10,
                        epochs=epochs)
    c.data.label_column = column  # the label list's column in the original's Arrow files (JSONL: "labels")
    c.data.label_fraction = 1.0  # 0.01 / 0.1 / 1.0: the share of training images (seeded random subset)
    c.data.label_seed = 0
    return c
