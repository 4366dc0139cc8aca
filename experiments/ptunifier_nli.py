"""PTUnifier language-only NLI: the premise/hypothesis pair with visual prompts in place of the image,
3-way accuracy on RadNLI (trained on MedNLI + RadNLI; Chen et al., ICCV 2023, NLI table; the released
`task_finetune_nli_radnli_plus` config).

    python -m medjax.train --exp ptunifier_nli --variant full --data DIR --set init=runs/ptunifier
    python -m medjax.evaluate --exp ptunifier_nli --checkpoint runs/nli

"full": `nli_radnli_plus_{split}.arrow` (columns text_a, text_b, label, split), batch 16, 20 epochs;
14,040 steps = 20 epochs of MedNLI's 11,232 training pairs (the "plus" file also holds RadNLI's
pseudo-train pairs: set train.steps = 20 x its rows / 16 for exact epochs), heads at lr x50,
multi-modal modules x5, pairs up to 64 tokens. "demo", "tiny": the demo's nli.jsonl.
"""
from __future__ import annotations

from experiments._ptunifier_finetune import finetune_config


def get_config(variant: str = "full"):
    if variant not in ("full", "demo", "tiny"):
        raise ValueError(f"ptunifier_nli: unknown variant {variant!r}; choose full, demo or tiny")
    return finetune_config(variant, "ptunifier_nli", file="nli_radnli_plus_{split}.arrow", demo_file="nli.jsonl",
                           max_text_len=64, batch_size=16, steps=14040, head_multiplier=50, multi_modal_multiplier=5,
                           epochs=20)
