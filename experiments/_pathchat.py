"""The PathChat / LLaVA-1.5 config both stages share (experiments pathchat_stage1, pathchat_stage2).

Full variant: PathChat's architecture (Lu et al., Nature 2024) with public stand-ins where its weights are not
released: a ViT-L vision tower (CLIP ViT-L/14-336 as in LLaVA-1.5, penultimate layer: 23 of 24 blocks, via
`model.init_vision`; UNI's ViT-L/16 once converted), the attention-pooling projector, Llama 2 13B (`model.init_llm`,
e.g. Llama-2-13b-chat-hf). Variant full_7b: the same with Llama 2 7B (width 4096, 32 layers, 32 heads, MLP 11008).
What neither paper states is our choice, marked so.
"""
from __future__ import annotations

import ml_collections

from experiments._common import base_config


def pathchat_config(variant: str, stage: int) -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "pathchat"
    c.variant = variant
    c.dtype = "bfloat16"  # LLaVA trains in bf16; params stay float32
    c.data.update(dict(
        dir="",  # "" = the pathology_chat demo in the cache
        tokenizer="",  # a local Hugging Face tokenizer directory; "" = <dir>/tokenizer
        train_file="pretrain.json" if stage == 1 else "instruct_train.json",  # LLaVA-format JSON list
        eval_file="" if stage == 1 else "instruct_val.json",
        mcq_file="" if stage == 1 else "pathqabench/mcq.jsonl",  # PathQABench multiple choice
        open_file="" if stage == 1 else "pathqabench/open.jsonl",  # PathQABench open-ended
        template="plain" if stage == 1 else "llama_2",  # PathChat's LLM is Llama 2 chat: its template
        max_length=2048,  # LLaVA-1.5's model_max_length
        # Length bucketing (medjax.data.pipelines.length_buckets): rows padded to the smallest of these lengths (and
        # max_length) holding their batch's longest conversation, batches length-grouped over windows of
        # length_group_batches global batches; one compiled step per bucket. [] = every row padded to max_length.
        # Powers of two from 256 (128 image queries + prompt) are our choice.
        length_buckets=[256, 512, 1024],
        length_group_batches=8,  # our choice (HF's LengthGroupedSampler groups 50 batches)
        prefetch_threads=2,
    ))
    c.model = ml_collections.ConfigDict(dict(
        init_llava="",  # a Hugging Face llava directory (the whole model), else the parts below
        # "clip": CLIP ViT-L/14-336 (LLaVA-1.5; init_vision = a Hugging Face CLIP vision directory); "uni": UNI's
        # ViT-L/16 (PathChat's UNI-based encoder; init_vision = UNI's pytorch_model.bin / .safetensors, read by
        # medjax.convert.uni, its architecture from the checkpoint; from scratch also set image_size=224 patch_size=16)
        vision_tower="clip",
        init_vision="",
        init_llm="",  # a Hugging Face llama directory (Llama-2-13b-chat-hf)
        image_size=336, patch_size=14, vision_width=1024, vision_feature_depth=23, vision_heads=16,
        vision_mlp_dim=4096,  # CLIP ViT-L/14-336 up to its penultimate layer
        projector="attention_pool", num_queries=128,  # PathChat's projector; 128 queries is our choice
        freeze_vision=True,  # no gradient reaches the vision tower (LLaVA, PathChat keep it frozen)
        # towers frozen by optim.frozen are stored in this dtype ("" = float32): stage 1's frozen 7B Llama is 13.5 GB
        # in bf16 with no fp32 copy and no optimizer state (trained params keep float32 masters); our choice
        frozen_param_dtype="bfloat16",
        vocab_size=32000, width=5120, depth=40, num_heads=40, num_kv_heads=0, mlp_dim=13824,  # Llama 2 13B
        rms_norm_eps=1e-5, rope_theta=10000.0,
        scan=True, remat="full",  # one scanned 40-layer stack, recomputed in the backward pass
    ))
    c.eval = ml_collections.ConfigDict(dict(max_new_tokens=256))
    c.mesh.update(dict(rules="fsdp"))  # FSDP presets: --set mesh.fsdp=8, or mesh.fsdp=4 mesh.tensor=2 mesh.rules=fsdp_tp
    if stage == 1:  # alignment: 558K pairs, batch 256, 1 epoch, lr 1e-3, cosine, warmup 3 %, wd 0
        c.train.update(dict(steps=2180, batch_size=256, log_every=10, checkpoint_every=500, eval_batch_size=16))
        c.optim.update(dict(lr=1e-3, warmup_steps=0, warmup_fraction=0.03, weight_decay=0.0, b2=0.999, clip_norm=1.0))
        c.optim.frozen = [r"^vision_tower/", r"^language_model/"]  # the projector only
    else:  # instruction tuning: PathChat's 456,916 instructions, batch 128, 1 epoch, lr 2e-5
        c.train.update(dict(steps=3570, batch_size=128, log_every=10, checkpoint_every=500, eval_batch_size=16))
        c.optim.update(dict(lr=2e-5, warmup_steps=0, warmup_fraction=0.03, weight_decay=0.0, b2=0.999, clip_norm=1.0))
        c.optim.frozen = [r"^vision_tower/"]  # LLM + projector
    c.optim.wd_mults = [(r".*", 1.0)]

    small = dict(init_llava="", init_vision="", init_llm="", patch_size=8, num_kv_heads=2, vocab_size=0,
                 scan=False, remat="none", rope_theta=10000.0, frozen_param_dtype="")
    if variant == "demo":
        c.dtype = "float32"
        c.data.update(dict(max_length=192, length_buckets=[]))  # one compiled step (CPU: compiles dominate)
        c.model.update(dict(small, image_size=32, vision_width=64, vision_feature_depth=2, vision_heads=4,
                            vision_mlp_dim=128, num_queries=8, width=96, depth=2, num_heads=4, mlp_dim=192))
        c.train.update(dict(steps=120, batch_size=8, log_every=10, checkpoint_every=60, eval_batch_size=8))
        c.optim.update(dict(lr=3e-3 if stage == 1 else 1e-3, warmup_fraction=0.05))  # our choice, demo scale
        c.eval.max_new_tokens = 24
        # The demo has no pretrained towers: a projector alone cannot align two random networks, so the demo
        # trains the LLM in stage 1 too and everything in stage 2 (our choice; tiny keeps the paper's freezing).
        c.optim.frozen = [r"^vision_tower/"] if stage == 1 else []
    elif variant == "tiny":
        c.dtype = "float32"
        c.data.update(dict(max_length=128, length_buckets=[]))  # one compiled step (tests opt in to buckets)
        c.model.update(dict(small, image_size=16, vision_width=32, vision_feature_depth=1, vision_heads=4,
                            vision_mlp_dim=64, num_queries=4, width=32, depth=2, num_heads=4, mlp_dim=64))
        c.train.update(dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8))
        c.eval.max_new_tokens = 4
    elif variant == "full_7b":  # the same recipe with Llama 2 7B (LLaVA-1.5-7B's LLM size; Touvron et al. 2023)
        c.model.update(dict(width=4096, depth=32, num_heads=32, mlp_dim=11008))
    elif variant != "full":
        raise ValueError(f"pathchat_stage{stage}: unknown variant {variant!r}; choose full, full_7b, demo or tiny")
    return c
