"""ViSD-Boost stage 2 (Cao et al., ICCV 2025, Sec. 3.3): the per-anatomy VQ-VAE learns the normal organs'
stage-4 tokens of the frozen stage-1 backbone (experiments/_visd.py).

    python -m medjax.train --exp visd_stage2_vqvae --set init=runs/visd1 --workdir runs/visd2
    python -m medjax.train --exp visd_stage2_vqvae --variant full --data DIR --set init=runs/visd1 --workdir runs/visd2
Next: experiments/visd_stage3_vlp.py with --set init=runs/visd2.
"""
from experiments._visd import visd_config


def get_config(variant: str = "full"):
    return visd_config("vqvae", variant)
