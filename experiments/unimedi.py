"""UniMedI pretraining on unpaired 2D X-ray-report and 3D CT-report data (He et al., "Unified Medical Image
Pre-training in Language-Guided Common Semantic Space", ECCV 2024; no public code exists).

    python -m medjax.train --exp unimedi                       # demo variant on demo data (CPU, minutes)
    python -m medjax.train --exp unimedi --variant full --data DIR \
        --set model.init_text=Bio_ClinicalBERT/ --set data.tokenizer=Bio_ClinicalBERT/
                                                               # the paper's setup (MIMIC-CXR + BIMCV layout)
    python -m medjax.evaluate --exp unimedi --checkpoint WORKDIR

`--data DIR` holds `xray/manifest.jsonl` (`{"image", "captions", "labels"?, "split"}`, images relative to it),
`ct/manifest.jsonl` (`{"volume": ".nii.gz", "captions", "labels"?, "split"}`) and, unless data.tokenizer is
given, `tokenizer/`. Variants: "full" (the paper's architecture: ViT-B/16 with T_2D 16x16 and T_3D 4x16x16
tokenizers, a BERT-base report encoder, DINO head), "demo", "tiny" (tests).

What the paper states is followed; what it leaves open is our choice, marked so below: the 3D input grid,
k, the mask ratio, the projection width, the DINO head size and temperatures, the optimizer and schedule,
which slice of a 4-slice slab becomes its 2D image (the centre), the pixel scale.
"""
from __future__ import annotations

import ml_collections

from experiments._common import base_config


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "unimedi"
    c.variant = variant
    c.data.update(dict(
        dir="",  # "" = the xray_ct_reports demo in the cache
        xray_manifest="xray/manifest.jsonl",  # "" = no 2D data
        ct_manifest="ct/manifest.jsonl",  # "" = no 3D data
        tokenizer="",  # a local Hugging Face tokenizer directory; "" = <dir>/tokenizer
        split="train",
        eval_split="val",
        fraction_2d=0.5,  # the 2D share of every global batch (the 2D:3D sampler ratio; 0 or 1: one kind only)
        max_length=128,  # report tokens
        spacing=(1.5, 1.5, 3.0),  # mm, CT resampling before the resize to model.volume_shape (our choice)
        hu_range=(-1000.0, 1000.0),  # chest CT window scaled to [0, 1] (our choice, CT-CLIP's)
        prefetch_threads=2,
    ))
    c.model = ml_collections.ConfigDict(dict(
        image_size=224, patch_size=16,  # T_2D: ViT-B/16 on 224 x 224 (196 patches)
        volume_shape=(32, 224, 224),  # (slices, H, W) every CT is resized to (our choice)
        volume_patch=(4, 16, 16),  # T_3D (the paper's example): 8 x 14 x 14 = 1568 patches
        num_selected_slices=4,  # k (our choice)
        width=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path=0.1,  # ViT-B
        # nn.scan the 12 blocks (None: depth >= 12); remat none|full|dots_saveable. "full" (our choice): a pseudo pair is
        # 1 + 1568 + 4 x 196 = 2353 tokens, and without remat one batch-1 step ran out of 23 GB of host memory
        scan=None, remat="full",
        text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072, max_positions=512,  # BERT-base
        vocab_size=0,  # 0 = the tokenizer's size (a scratch text encoder); init_text brings its own
        init_text="",  # a local Hugging Face BERT directory (BioClinicalBERT in the paper)
        embed_dim=512,  # shared image-text width (our choice)
    ))
    c.head = ml_collections.ConfigDict(dict(out_dim=8192, hidden_dim=2048, bottleneck_dim=256, num_layers=3))
    c.distill = ml_collections.ConfigDict(dict(
        mask_ratio=0.75,  # "heavily masked" student view (our choice of how heavily)
        teacher_momentum=0.996,  # DINO's cosine 0.996 -> 1
        teacher_temp=0.04, student_temp=0.1, sinkhorn_iterations=3,
        contrast_on_masked_view=False,  # L_vl from a separate unmasked student forward (module doc of the task)
    ))
    c.loss = ml_collections.ConfigDict(dict(vl_weight=1.0, icl_weight=1.0, pcl_weight=1.0, init_temperature=0.07))
    c.eval = ml_collections.ConfigDict(dict(
        label_fractions=(0.01, 0.1, 1.0),  # linear probe at 1 / 10 / 100 % of the train labels
        label_seed=0,
        xray_labels=("opacity", "pleural effusion"),  # zero-shot prompt names, in the manifests' label order
        ct_labels=("nodule", "pleural effusion"),
    ))
    c.train.update(dict(steps=50000, batch_size=128, log_every=50, checkpoint_every=2500, eval_batch_size=32))
    c.optim.update(dict(lr=1e-4, warmup_steps=0, warmup_fraction=0.05, weight_decay=0.05, b1=0.9, b2=0.98,
                        clip_norm=3.0))  # our choice
    c.optim.frozen = [r"^teacher/"]  # the EMA teacher is not trained
    c.optim.wd_mults = [(r"(^|/)(bias|scale|logit_scale|cls_token|pos_embed|volume_pos_embed|mask_token)$", 0.0),
                        (r".*", 1.0)]

    if variant == "demo":
        c.data.update(dict(max_length=24, spacing=(1.5, 1.5, 2.5)))
        c.model.update(dict(image_size=64, volume_shape=(16, 64, 64), num_selected_slices=2, width=64, depth=4,
                            num_heads=4, drop_path=0.0, remat="none", text_width=64, text_depth=2, text_heads=4,
                            text_mlp_dim=128, max_positions=32, embed_dim=64))
        # 64 prototypes (our choice): Sinkhorn spreads a batch's 16 [CLS] rows evenly over them; with 256 the DINO
        # terms stayed near ln K over the demo (loss 13.7 -> 11.0 in 200 steps; 10.6 -> 7.9 in 300 steps with 64)
        c.head.update(dict(out_dim=64, hidden_dim=128, bottleneck_dim=32))
        c.distill.mask_ratio = 0.5
        c.eval.label_fractions = (0.1, 1.0)
        c.train.update(dict(steps=300, batch_size=16, log_every=10, checkpoint_every=100, eval_batch_size=16))
        c.optim.update(dict(lr=5e-4, warmup_fraction=0.1))
    elif variant == "tiny":
        c.data.update(dict(max_length=12, spacing=(1.5, 1.5, 2.5)))
        c.model.update(dict(image_size=32, volume_shape=(8, 32, 32), num_selected_slices=1, width=32, depth=2,
                            num_heads=4, drop_path=0.0, remat="none", text_width=32, text_depth=1, text_heads=4,
                            text_mlp_dim=64, max_positions=16, embed_dim=16))
        c.head.update(dict(out_dim=64, hidden_dim=32, bottleneck_dim=16))
        c.distill.mask_ratio = 0.5
        c.eval.label_fractions = (1.0,)
        c.train.update(dict(steps=3, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=4))  # 4 + 4: each kind splits over data x fsdp
        c.optim.update(dict(lr=1e-3))
    elif variant != "full":
        raise ValueError(f"unimedi: unknown variant {variant!r}; choose full, demo or tiny")
    return c
