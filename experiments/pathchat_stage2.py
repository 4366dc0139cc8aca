"""PathChat / LLaVA-1.5 stage 2: visual instruction tuning of the LLM and the projector on pathology
conversations (Lu et al., Nature 2024), template "llama_2"; evaluation in PathQABench's layout.

    python -m medjax.train --exp pathchat_stage2                        # demo variant on demo data (CPU)
    python -m medjax.train --exp pathchat_stage2 --variant full --data DIR --set init=STAGE1_WORKDIR \
        --set model.init_vision=... --set model.init_llm=... --set data.tokenizer=...
    python -m medjax.evaluate --exp pathchat_stage2 --checkpoint WORKDIR

`--data DIR` holds `instruct_train.json` / `instruct_val.json` (LLaVA's multi-turn format),
`pathqabench/mcq.jsonl` (`{"id", "image", "question", "choices", "answer": letter, "context"}`),
`pathqabench/open.jsonl` (`{"id", "image", "question", "reference"}`) and `tokenizer/`.
Variants: full (the paper: Llama 2 13B), full_7b (Llama 2 7B), demo, tiny (tests). Pod-scale memory plan:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m medjax.bench step --exp pathchat_stage2 \
        --variant full --aot-only --mesh fsdp=4,tensor=2
"""
from experiments._pathchat import pathchat_config


def get_config(variant: str = "full"):
    return pathchat_config(variant, stage=2)
