"""PTUnifier MIMIC-CXR report generation (image -> findings) and summarisation (findings [+ image] ->
impression): a decoder on the fused features, beam search (beam 5), BLEU-1..4 and ROUGE-L (Chen et al.,
ICCV 2023, generation table; the released `task_finetune_clm_mimic_cxr_{vision_only,language_only,
vision_language}` configs).

    python -m medjax.train --exp ptunifier_reportgen --data DIR --set init=runs/ptunifier --workdir runs/rg
    python -m medjax.evaluate --exp ptunifier_reportgen --checkpoint runs/rg

Variants: "full" = report generation (vision only: textual prompts stand in for the text, findings as
the target, up to 256 tokens), "summarization" (language only: findings -> impression with visual prompts,
128 tokens), "vl_summarization" (image + findings -> impression, 128 tokens). `DIR` holds the original's
`clm_mimic_cxr_{train,val,test}.arrow` (columns image, caption, findings, impression, split). As released:
batch 128, 15 epochs, lr 5e-6, the decoder at x50 (it is a head, `clm_head`), multi-modal modules x5,
`clm_resizedcrop` training images, encoder text up to 256 tokens, beam 5; the paper's 384 px images (the
released configs say 576). Steps: 31,700 = 15 epochs x 270,790 training images / 128 (R2Gen's MIMIC-CXR
split; the original keeps images with one findings and one impression section: set train.steps = 15 x your
rows / 128). The released code decodes with `do_sample=True, num_beams=5` (HF beam *sampling*, top-k 50,
random); medjax defaults to deterministic beam search, `finetune.beam_sample=True` reproduces the sampling.
Metrics: pycocoevalcap's BLEU / ROUGE-L after the PTB tokenizer (java), as the original's coco_caption
scores; `finetune.eval_tokenizer=simple` without java. "demo", "tiny": the demo's reports.jsonl.
"""
from __future__ import annotations

from experiments import ptunifier
from experiments._ptunifier_finetune import finetune_config

VARIANTS = {  # variant: (mode, max target tokens = the original's clm_max_text_len)
    "full": ("vision", 256),
    "summarization": ("language", 128),
    "vl_summarization": ("vision_language", 128),
}


def get_config(variant: str = "full"):
    if variant not in VARIANTS and variant not in ("demo", "tiny"):
        raise ValueError(f"ptunifier_reportgen: unknown variant {variant!r}; choose {', '.join(VARIANTS)}, "
                         "demo or tiny")
    mode, target_len = VARIANTS.get(variant, VARIANTS["full"])
    c = finetune_config(variant, "ptunifier_reportgen", file="clm_mimic_cxr_{split}.arrow", demo_file="reports.jsonl",
                        max_text_len=256, batch_size=128, steps=31700, head_multiplier=50, multi_modal_multiplier=5, epochs=15,
                        resized_crop=True, mode=mode, max_target_len=target_len, num_beams=5, length_penalty=1.0,
                        beam_sample=False, top_k=50, decoder_layers=0, init_decoder_from_text=True,
                        eval_tokenizer="auto")
    # the decoder is the original's clm_head: a head (lr x50); clm_proj is neither head nor multi-modal (x1)
    c.optim.lr_mults = ptunifier.ptunifier_lr_mults(
        50, 5, heads=r"^(mlm_|itm_|itc_|task_head|report_decoder)[^/]*(/|$)",
        multi_modal_params=r"^(text_proj|image_proj|fusion_|text_pooler|image_pooler|visual_prompts|textual_prompts)[^/]*(/|$)")
    c.train.eval_batch_size = 16  # x 5 beams
    if variant == "demo":
        c.finetune.update(dict(max_target_len=48))
        c.train.update(dict(steps=300, eval_batch_size=16))
        c.optim.lr = 3e-4
    elif variant == "tiny":
        c.finetune.update(dict(max_target_len=12, num_beams=3))
    return c
