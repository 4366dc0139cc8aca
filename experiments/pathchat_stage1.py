"""PathChat / LLaVA-1.5 stage 1: vision-language alignment on image-caption pairs, the projector trained
alone (Lu et al., Nature 2024; Liu et al., CVPR 2024), template "plain".

    python -m medjax.train --exp pathchat_stage1                        # demo variant on demo data (CPU)
    python -m medjax.train --exp pathchat_stage1 --variant full --data DIR \
        --set model.init_vision=clip-vit-large-patch14-336/ --set model.init_llm=Llama-2-13b-chat-hf/ \
        --set data.tokenizer=Llama-2-13b-chat-hf/

`--data DIR` holds `pretrain.json` (LLaVA's format: `[{"id", "image", "conversations": [human "<image>",
gpt caption]}]`, images relative to DIR) and, unless data.tokenizer is given, `tokenizer/` (with `<image>`).
Variants: full (the paper: Llama 2 13B), full_7b (Llama 2 7B), demo, tiny (tests); the shared block is experiments/_pathchat.py.
"""
from experiments._pathchat import pathchat_config


def get_config(variant: str = "full"):
    return pathchat_config(variant, stage=1)
