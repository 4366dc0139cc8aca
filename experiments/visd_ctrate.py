"""ViSD-Boost on CT-RATE (Cao et al., ICCV 2025): the final model (stage 3's, experiments/visd_stage3_vlp.py)
under the zero-shot protocol, in the CT-RATE table beside fVLM (experiments/fvlm_ctrate.py).

    python -m medjax.evaluate --exp visd_ctrate --checkpoint runs/visd3 [--data DIR]
    python -m medjax.convert visd --torch checkpoint.pth --vqvae checkpoint_vqvae.pth --out params/visd
    python -m medjax.evaluate --exp visd_ctrate --variant full --checkpoint params/visd --data DIR
Training it directly (`medjax.train --exp visd_ctrate`) runs stage 3 from scratch.
"""
from experiments._visd import visd_config


def get_config(variant: str = "full"):
    return visd_config("vlp", variant)
