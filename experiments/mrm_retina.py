"""MRM pretraining on fundus images + genotypes (Yang et al., "MRM: Masked Relation Modeling for
Medical Image Pre-Training with Genetics", ICCV 2023).

    python -m medjax.train --exp mrm_retina                      # demo variant on demo data (CPU, minutes)
    python -m medjax.train --exp mrm_retina --data DIR           # the paper's setup on your data
    python -m medjax.train --exp mrm_retina --variant tiny       # the test-sized code path

Variants: "full" (default: ViT-B/16 at 224, the paper's setup), "demo" (what runs when no --data
is given), "tiny" (tests). Numbers the paper does not give are our choices and say so below.
"""
from __future__ import annotations

import ml_collections

from experiments._common import base_config



def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "mrm"
    c.variant = variant
    c.data.update(dict(
        drop_missing_snps=False,  # True: drop SNPs whose every call is missing (always reported)
        allow_duplicates=False,  # True: keep repeated manifest rows / participant+eye (with a warning)
        dir="",  # <dir>/manifest.csv + genotypes.bed/.bim/.fam; "" = the demo dataset in the cache
        kind="fundus_genome",
        snp_stride=100,  # every 100th SNP within each chromosome's file (ContIG's slice(0, None, 100))
        # PLINK prefix under dir: one merged file set, or "ukb_chr{c}_v2" for ContIG's one set per chromosome
        genotypes="genotypes",
        chromosomes=list(range(1, 23)),  # ContIG's chromosomes 1-22 (a merged file's X / Y / MT are dropped)
        count_a1=False,  # dosages = copies of A2, as ContIG's pysnptools Bed(count_A1=False)
        split_order="sorted",  # held-out participants: permutation of the sorted unique ids (ContIG)
        split="",  # "" = every manifest row (pretraining uses all participants)
        eval_split="",  # rows for `evaluate` (losses on held-out data); "" = all rows
        rotation=20.0,  # RandomRotation(20) + horizontal flip + ImageNet normalisation (ContIG)
        hflip=True,
    ))
    c.model = ml_collections.ConfigDict(dict(
        # Image encoder: ViT-B/16 at 224 (paper).
        image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path=0.0,
        pos_embed="sincos",  # fixed 2D sin-cos as the authors' MAE code ("learned": trained N(0, 0.02) table)
        # Genome encoder: SNN with 2 layers (Klambauer et al. 2017); tokens of 64 SNPs (our choice).
        genome_token_size=64, genome_width=768, genome_heads=12, snn_layers=2, snn_dropout=0.1,
        # Decoders: MAE's 512-wide 8-block decoder (the authors' MAE code); genome decoder 2 blocks (our choice).
        decoder_width=512, decoder_depth=8, decoder_heads=16, genome_decoder_depth=2,
        # Relation masking ratios tau and the weight lambda: not given in the paper; our choice.
        tau_image=0.5, tau_genome=0.5, tau_cross=0.5, lam=1.0,
        # sim of relation matching: the paper says cosine, not whether features are centred. Our choice: centred
        # over the batch ("cosine": plain), since plain cosines of pooled features sit near 1 (relation_matching.py).
        relation_similarity="centered_cosine",
        # Where self-modality masking sits (medjax/models/mrm.py): [] = one extra block on the embeddings (our
        # choice: the encoder's own layers stay plain attention); [i, ...] = inside the image encoder's attention
        # layers i (needs scan=false). relation_output "literal": the paper's z^S = R^M V, no residual / MLP.
        mask_layers=[], relation_output="block",
        # Pixel target as the authors' main_pretrain.py (CityU-AIM-Group/MRM: norm_pix_loss defaults to False).
        # True = MAE's per-patch normalised target; on the demo it removes the lesions' colour (linear probe of the
        # pooled features on APTOS grades after pretraining: macro AUC 0.64 with it, 0.78 without).
        norm_pix_loss=False,
        remat="none",  # image encoder blocks: "none" | "full" | "dots_saveable" (recompute in backward)
        scan=None,  # nn.scan the image encoder's blocks; None: when depth >= 12 (params under blocks/)
    ))
    # Optimisation: MAE's recipe (AdamW b2=0.95, wd 0.05, base lr 1.5e-4 at batch 256, cosine, warmup).
    c.train.update(dict(steps=30000, batch_size=256, log_every=50, checkpoint_every=1000, eval_batch_size=64))
    c.optim.update(dict(lr=1.5e-4, warmup_steps=1500, weight_decay=0.05, b2=0.95))

    if variant == "demo":
        c.data.snp_stride = 1
        c.model.update(dict(image_size=64, patch_size=8, width=96, depth=4, num_heads=4,
                            genome_token_size=64, genome_width=96, genome_heads=4,
                            decoder_width=64, decoder_depth=2, decoder_heads=4, genome_decoder_depth=1))
        # Sized to finish in a few minutes on 2 CPU cores (compile included).
        c.train.update(dict(steps=120, batch_size=32, log_every=5, checkpoint_every=40, eval_batch_size=32))
        c.optim.update(dict(lr=1e-3, warmup_steps=10))
    elif variant == "tiny":
        c.data.snp_stride = 10
        c.model.update(dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                            genome_token_size=16, genome_width=32, genome_heads=2,
                            decoder_width=32, decoder_depth=1, decoder_heads=2, genome_decoder_depth=1))
        c.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8))
        c.optim.update(dict(lr=1e-3, warmup_steps=1))
    elif variant != "full":  # "full" is the paper's setup above
        raise ValueError(f"mrm_retina: unknown variant {variant!r}; choose full, demo or tiny")
    return c
