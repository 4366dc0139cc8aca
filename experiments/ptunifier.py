"""PTUnifier pretraining on image-report pairs (Chen, Diao, Wang, Li, Wan, "Towards Unifying Medical
Vision-and-Language Pre-training via Soft Prompts", ICCV 2023).

    python -m medjax.train --exp ptunifier                       # demo variant on demo data (CPU, minutes)
    python -m medjax.train --exp ptunifier --variant full --data DIR \
        --set model.init_vision=clip-vit-base-patch16/ --set model.init_text=biomed_roberta_base/ \
        --set data.tokenizer=biomed_roberta_base/                # the paper's setup (ROCO + MedICaT + MIMIC-CXR)
    python -m medjax.train --exp ptunifier --variant tiny        # the test-sized code path

Variants: "full" (the paper's setup: the released `task_pretrain_ptunifier` config with its run script's
`clip16 text_roberta image_size=288 max_text_len=48`), "demo" (what runs when no --data is given),
"tiny" (tests). `reproduce_released_code=True` freezes the prompt pools and drops ITC, as the released
code effectively does; the default follows the paper (learnable prompts, ITC on).
"""
from __future__ import annotations

import ml_collections

from experiments._common import base_config
from medjax.models.ptunifier import PTUNIFIER_FULL, PTUNIFIER_TINY

# The original's `set_schedule` param groups, by top-level module: names with *_head (our MLM/ITM/ITC heads)
# at lr x lr_multiplier_head; "multi_modal" / "pseudo" ones (projections, poolers, fusion layers, prompt
# pools) at x lr_multiplier_multi_modal; the rest (towers, modality_type_embeddings) at the base lr.
HEAD_PARAMS = r"^(mlm_transform|mlm_norm|mlm_decoder|mlm_bias|itm_head|itc_image_norm|itc_text_norm|itc_image_proj|itc_text_proj)(/|$)"
MULTI_MODAL_PARAMS = r"^(text_proj|image_proj|text_pooler|image_pooler|visual_prompts|textual_prompts|fusion_[^/]*)(/|$)"
# No weight decay on biases and LayerNorm scales (the original's no_decay names).
PTUNIFIER_WD_MULTS = [(r"(^|/)(bias|mlm_bias|scale)$", 0.0), (r".*", 1.0)]


def ptunifier_lr_mults(head: float, multi_modal: float, heads: str = HEAD_PARAMS,
                       multi_modal_params: str = MULTI_MODAL_PARAMS) -> list:
    """optim.lr_mults for the two groups (heads first: the first matching rule wins)."""
    return [(heads, float(head)), (multi_modal_params, float(multi_modal))]


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "ptunifier"
    c.variant = variant
    c.reproduce_released_code = False
    c.data.update(dict(
        dir="",  # folder holding the files below (and tokenizer/); "" = the demo dataset in the cache
        kind="image_report",
        train_files="manifest.jsonl",  # comma-separated JSONL manifests or the original's .arrow files, under dir
        eval_files="",  # "" = train_files (rows of eval_split)
        split="train",  # "" = every row
        eval_split="val",
        tokenizer="",  # a local Hugging Face tokenizer directory; "" = <dir>/tokenizer
        max_length=48,  # max_text_len=48 (run script)
        resized_crop=True,  # clip_resizedcrop: RandomResizedCrop(scale 0.9-1) for pretraining
        sent_level=True,  # one random caption sentence per sample
        mlm_probability=0.15,
        whole_word_masking=False,  # True: mask whole words (BERT-family tokenizers; medjax.data.transforms.mlm_masking)
    ))
    c.model = ml_collections.ConfigDict(dict(
        PTUNIFIER_FULL,  # CLIP ViT-B/16 (11 blocks as METER's builder keeps) at 288, RoBERTa-base, 6 fusion layers
        init_vision="",  # local HF CLIP directory (e.g. openai/clip-vit-base-patch16) for the vision tower
        init_text="",  # local HF RoBERTa directory (BioMed-RoBERTa-base in the paper) for the text tower
    ))  # model.vocab_size = 0: the tokenizer's size
    c.loss = ml_collections.ConfigDict(dict(mlm=1.0, itm=0.5, itc=0.1, itc_temperature=0.1))
    # task_pretrain_ptunifier: 100k steps, batch 256, lr 1e-5 (x5 heads / multi-modal), warmup 10%, linear decay;
    # AdamW betas (0.9, 0.98), eps 1e-8, wd 0.01; no gradient clipping (Lightning default).
    c.train.update(dict(steps=100000, batch_size=256, log_every=50, checkpoint_every=5000, eval_batch_size=64))
    c.optim.update(dict(lr=1e-5, schedule="linear", warmup_steps=0, warmup_fraction=0.1, weight_decay=0.01,
                        b1=0.9, b2=0.98, eps=1e-8, clip_norm=0.0))
    c.optim.lr_mults = ptunifier_lr_mults(head=5.0, multi_modal=5.0)  # lr_multiplier_head / _multi_modal
    c.optim.wd_mults = PTUNIFIER_WD_MULTS

    if variant == "demo":
        c.model.update(dict(image_size=64, patch_size=16, vision_width=64, vision_depth=2, vision_heads=4,
                            vision_mlp_dim=128, vocab_size=0, text_width=64, text_depth=2, text_heads=4,
                            text_mlp_dim=128, max_positions=40, hidden_size=64, fusion_layers=2, fusion_heads=4,
                            fusion_mlp_dim=128, pool_size=64, num_visual_prompts=8, num_textual_prompts=6))
        c.data.max_length = 32
        # From scratch (no pretrained towers), sized for a few minutes on 2 CPU cores, the paper's loss weights and
        # lr groups. ITC and ITM leave chance after ~100 / ~180 steps (issue #23; numbers in the README). What kept
        # them at ln 32 / ln 2 before: Glorot-initialised cross-modal modules (the original uses init_weights,
        # N(0, 0.02): models/ptunifier.INIT), whose misaligned initial features the first steps
        # collapsed (cosine 0.78 -> 0.98), and demo reports whose picked sentence sometimes named nothing drawn.
        c.train.update(dict(steps=300, batch_size=32, log_every=10, checkpoint_every=100, eval_batch_size=32))
        c.optim.update(dict(lr=5e-4))
    elif variant == "tiny":
        c.model.update(dict(PTUNIFIER_TINY, vocab_size=0))
        c.data.max_length = 16
        c.train.update(dict(steps=3, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8))
        c.optim.update(dict(lr=1e-3))
    elif variant != "full":
        raise ValueError(f"ptunifier: unknown variant {variant!r}; choose full, demo or tiny")
    return c
