"""MRM transfer: RFMiD multi-label retinal disease classification (43 labels, AUC) by fine-tuning the MRM-pretrained
image encoder (Yang et al., ICCV 2023, Tab. 1), with ContIG's RFMiD protocol (medjax/tasks/fundus_multilabel.py).

    python -m medjax.train --exp mrm_rfmid --set init=runs/mrm --set data.label_fraction=0.01 --workdir runs/rfmid_mrm_1
    python -m medjax.train --exp mrm_rfmid --set init=runs/mae --set data.label_fraction=0.01 --workdir runs/rfmid_mae_1
    python -m medjax.evaluate --exp mrm_rfmid --checkpoint runs/rfmid_mrm_1 runs/rfmid_mae_1 ...

Label fractions 1% / 10% / 100% of the training split as in the paper; `--data DIR` is the RFMiD root (the
released Training_Set / Evaluation_Set / Test_Set folders). The encoder must match the pretraining run's `model`
block. The run validates every `train.eval_every` steps and keeps the lowest validation loss in WORKDIR/best
(ContIG's selection), which `evaluate` tests.

The `demo` and `tiny` variants score only the conditions the synthetic demo draws into its pictures (DR, MH, TSLN,
LS, ARMD, ODC, MYA: `medjax.data.demo.fundus_transfer.RENDERED`; `data.drop_labels` drops the other 39 columns,
7 outputs): the demo's other conditions are labels with nothing in the image, whose AUC no model can lift above
chance, so a 43-label macro AUC would read as chance however well the drawn ones are learnt. On real RFMiD data
use the `full` variant (ContIG's 43 labels) or set `data.drop_labels` / `model.num_classes` yourself.
"""
from __future__ import annotations

import ml_collections

from experiments import mrm_aptos
from medjax.data.demo.fundus_transfer import RENDERED
from medjax.data.readers.rfmid import RFMID_LABELS

# demo / tiny: every label column but the conditions the demo draws (module docstring)
DEMO_DROPPED = [name for name in RFMID_LABELS if name not in RENDERED]


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = mrm_aptos.get_config(variant)  # same encoder, optimiser and schedule as the APTOS transfer
    c.task = "fundus_multilabel"
    c.data = c.data.copy_and_resolve_references()
    for key in ("allow_duplicates", "kind", "demo_subdir", "train_split", "eval_split"):
        del c.data[key]
    c.data.update(dict(
        kind="fundus_transfer", demo_subdir="rfmid",  # "" dir = the demo's rfmid/ set
        drop_labels=["Disease_Risk", "HR", "ODPM"],  # ContIG's drop_disease_risk_hr_odpm=True: 46 -> 43 labels
        train_split="train", val_split="val", eval_split="test",  # the released Training / Evaluation / Test sets
        rotation=0.0, hflip=True,  # ContIG's RFMiD loader: Resize + RandomHorizontalFlip only
    ))
    c.model.update(dict(num_classes=43, head="multilabel"))
    # ContIG trains 50 epochs of the 1920 training images: with batch 64, 30 steps an epoch; validated each epoch.
    c.train.update(dict(steps=1500, eval_every=30))
    if variant in ("demo", "tiny"):
        c.data.drop_labels = list(DEMO_DROPPED)
        c.model.num_classes = len(RENDERED)
    if variant == "demo":
        c.train.update(dict(steps=150, eval_every=10))
    elif variant == "tiny":
        c.train.update(dict(steps=4, eval_every=2))
    return c
