"""PTUnifier image + text classification on MELINDA (figure + caption -> experimental method), top-1
accuracy (Chen et al., ICCV 2023, Table 4; the released `task_finetune_cls_melinda_*` configs).

    python -m medjax.train --exp ptunifier_melinda --variant p_meth --data DIR --set init=runs/ptunifier
    python -m medjax.evaluate --exp ptunifier_melinda --checkpoint runs/melinda_i_meth runs/melinda_p_meth

Variants (the label column and the original's `label_size`): "full" = "i_meth" (85 intermediate methods),
"p_meth" (45 participant methods), "i_meth_label" (15 coarse intermediate), "p_meth_label" (7 coarse
participant). `DIR` holds the original's `cls_melinda_{train,val,test}.arrow` (columns image, caption,
i_meth, p_meth, i_meth_label, p_meth_label, split; labels already numbered by make_arrow_melinda).
As released: batch 16, 20 epochs, lr 5e-6, heads x10, multi-modal modules x5, captions up to 128 tokens,
images 384 with the plain `clip` transform (no resized crop). 5,400 steps = 20 epochs of ~4,300 training
pairs (MELINDA's 5,371 figure-caption pairs, ~80% train); set train.steps = 20 x your rows / 16 for exact
epochs. "demo", "tiny": the demo's melinda.jsonl (i_meth = the first finding's shape, 5 classes; p_meth =
its colour, 4 classes; class names numbered in sorted order).
"""
from __future__ import annotations

from experiments._ptunifier_finetune import finetune_config

LABELS = {"i_meth": 85, "p_meth": 45, "i_meth_label": 15, "p_meth_label": 7}  # the original's label_size


def get_config(variant: str = "full"):
    column = "i_meth" if variant in ("full", "demo", "tiny") else variant
    if column not in LABELS:
        raise ValueError(f"ptunifier_melinda: unknown variant {variant!r}; choose full, "
                         f"{', '.join(LABELS)}, demo or tiny")
    c = finetune_config(variant, "ptunifier_melinda",
                        file="cls_melinda_{split}.arrow", demo_file="melinda.jsonl", max_text_len=128, batch_size=16,
                        steps=5400, head_multiplier=10, multi_modal_multiplier=5, resized_crop=False, epochs=20,
                        num_classes=0 if variant in ("demo", "tiny") else LABELS[column])
    c.data.label_column = column  # the class column (Arrow: one label per caption)
    return c
