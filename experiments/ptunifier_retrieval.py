"""PTUnifier image<->text retrieval on ROCO: the ITM "matched" logit scores every (image, text) pair,
R@1/5/10 in both directions (Chen et al., ICCV 2023, retrieval table; the released
`task_finetune_irtr_roco` config).

    python -m medjax.evaluate --exp ptunifier_retrieval --checkpoint runs/ptunifier --set data.image_size=288
                                                                   # zero-shot, at the pretraining size
    python -m medjax.train --exp ptunifier_retrieval --variant full --data DIR --set init=runs/ptunifier
    python -m medjax.evaluate --exp ptunifier_retrieval --checkpoint runs/retrieval   # fine-tuned, at 384

"full": ROCO (`irtr_roco_{split}.arrow`), batch 256, 10 epochs of ROCO's ~65.5k radiology training pairs -> 2,557 steps,
recall on the val split as the original (`--set data.eval_split=test` for test), 15 negative texts per image (drawn from the batch; the original draws random dataset texts), heads
and multi-modal modules at lr x5, texts up to 40 tokens. "demo", "tiny": the demo's manifest.jsonl.
"""
from __future__ import annotations

from experiments._ptunifier_finetune import finetune_config


def get_config(variant: str = "full"):
    if variant not in ("full", "demo", "tiny"):
        raise ValueError(f"ptunifier_retrieval: unknown variant {variant!r}; choose full, demo or tiny")
    # num_negatives: texts per image besides the true one (the original's draw_false_text: 15);
    # retrieval_score: how evaluation scores the pairs, "itm" (the paper), "itc" or "both"
    negatives = {"demo": 7, "tiny": 3}.get(variant, 15)
    c = finetune_config(variant, "ptunifier_retrieval", file="irtr_roco_{split}.arrow", demo_file="manifest.jsonl",
                           max_text_len=40, batch_size=256, steps=2557, head_multiplier=5, multi_modal_multiplier=5, epochs=10,
                           num_negatives=negatives, retrieval_score="itm")
    if variant != "tiny":  # the tests' tiny run keeps the test split
        c.data.eval_split = "val"  # the original's compute_irtr_recall reads val, even in test-only mode; test: an option
    return c
