"""ViSD-Boost stage 1 (Cao et al., ICCV 2025, Sec. 3.2): vision semantic enhancement, two augmented views of
each CT against a momentum encoder, normal organs positives of each other (experiments/_visd.py).

    python -m medjax.train --exp visd_stage1_vse --workdir runs/visd1            # demo, on demo data (CPU)
    python -m medjax.train --exp visd_stage1_vse --variant full --data DIR --workdir runs/visd1
Next: experiments/visd_stage2_vqvae.py with --set init=runs/visd1.
"""
from experiments._visd import visd_config


def get_config(variant: str = "full"):
    return visd_config("vse", variant)
