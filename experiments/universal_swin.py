"""CLIP-Driven Universal Model with a Swin UNETR backbone (Liu et al., "CLIP-Driven Universal Model
for Organ Segmentation and Tumor Detection", ICCV 2023): 32 classes, partial labels, 96^3 crops.

    python -m medjax.train --exp universal_swin                       # demo variant on CT demo data
    python -m medjax.convert embed-classes --clip CLIP_DIR --out emb.npy
    python -m medjax.train --exp universal_swin --data DIR --set model.class_embeddings=emb.npy
    python -m medjax.evaluate --exp universal_swin --checkpoint runs/x --data DIR
    python -m medjax.train --exp universal_swin --variant tiny        # the test-sized code path

Variants: "full" (default: the paper's setup, Swin UNETR feature size 48; experiments/_universal.py
lists every number and its source), "demo", "tiny".
"""
from __future__ import annotations

import ml_collections

from experiments._universal import universal_config



def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    return universal_config(variant, "swinunetr", "universal_swin")
