"""CLIP-Driven Universal Model with the Models-Genesis UNet3D backbone (Liu et al., ICCV 2023; the
original's `--backbone unet`, released as clip_driven_universal_unet.pth): 64-channel head feature,
512-channel pooled feature, otherwise the Swin setup (experiments/_universal.py).

    python -m medjax.train --exp universal_unet                       # demo variant on CT demo data
    python -m medjax.train --exp universal_unet --data DIR --set model.class_embeddings=emb.npy
    python -m medjax.train --exp universal_unet --variant tiny

Variants: "full" (default, the paper's setup), "demo", "tiny".
"""
from __future__ import annotations

import ml_collections

from experiments._universal import universal_config



def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    return universal_config(variant, "unet", "universal_unet")
