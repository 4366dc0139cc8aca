"""ViSD-Boost stage 3 (Cao et al., ICCV 2025, Sec. 3.4): fVLM's organ-level image-report contrast on the
normality-boosted hybrid features, the VQ-VAE frozen (experiments/_visd.py).

    python -m medjax.train --exp visd_stage3_vlp --set init=runs/visd2 --workdir runs/visd3
    python -m medjax.train --exp visd_stage3_vlp --variant full --data DIR --set init=runs/visd2 --workdir runs/visd3 \
        --set model.init_text=BiomedVLP-CXR-BERT-specialized/ --set data.tokenizer=BiomedVLP-CXR-BERT-specialized/
    python -m medjax.evaluate --exp visd_ctrate --checkpoint runs/visd3        # CT-RATE zero-shot table
"""
from experiments._visd import visd_config


def get_config(variant: str = "full"):
    return visd_config("vlp", variant)
