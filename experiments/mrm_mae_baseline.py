"""The MAE baseline of MRM's comparison (Yang et al., ICCV 2023, Tab. 1): the authors' plain MAE (their
repository's `models_mrm.py`: random 75% patch masking, 512-wide 8-block decoder, per-patch-normalised
MSE on the masked patches, fixed 2D sin-cos positions) on the same fundus images as `mrm_retina`, same
encoder, optimiser and steps, so the transfer runs compare the two pretrainings one for one:

    python -m medjax.train --exp mrm_mae_baseline --workdir runs/mae            # demo data
    python -m medjax.train --exp mrm_aptos --set init=runs/mae --workdir runs/aptos_mae
"""
from __future__ import annotations

import ml_collections

from experiments import mrm_retina
from experiments._common import base_config


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    mrm = mrm_retina.get_config(variant)  # raises on an unknown variant
    c = base_config()
    c.task = "mrm_mae"
    c.variant = variant
    c.data.update(dict(
        allow_duplicates=mrm.data.allow_duplicates, dir=mrm.data.dir, kind="fundus_genome",
        split=mrm.data.split, eval_split=mrm.data.eval_split, split_order=mrm.data.split_order,
        rotation=mrm.data.rotation, hflip=mrm.data.hflip,
    ))
    m = mrm.model
    c.model = ml_collections.ConfigDict(dict(
        image_size=m.image_size, patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, mask_ratio=0.75,  # MAE's 75% random patch masking
        decoder_width=m.decoder_width, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
        pos_embed="sincos", norm_pix_loss=m.norm_pix_loss, remat=m.remat, scan=m.scan,
    ))
    c.train = mrm.train.copy_and_resolve_references()
    c.optim = mrm.optim.copy_and_resolve_references()
    return c
