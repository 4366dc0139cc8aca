"""Config shared by the PTUnifier fine-tuning experiments (Chen et al., ICCV 2023, Sec. 4; the released
`task_finetune_*` configs): lr 5e-6, AdamW (0.9, 0.98) wd 0.01, linear warmup over 10% then linear decay,
images 384 (position embeddings resized bicubically from the pretraining grid), the backbone exactly
the pretraining run's `model` block (`experiments/ptunifier.py`), so `init=` a pretraining workdir loads.

Steps: the originals train for epochs; steps = epochs x training examples / batch (the counts used are
stated in each experiment). The released configs set image_size=576 for VQA and CheXpert; the paper
reports 384 for all fine-tuning, which we follow.

The released protocol (reference ptunifier.md, "Fine-tuning protocol of the released code"):
`freeze_prompt_pools=True` (the pools never train in fine-tuning; False trains them),
`resize_position_table_at_load=True` (the table is resized once at load to the 384 grid, then trained;
False keeps the pretraining table, resized at every forward), `data.resized_crop` per dataset
(`clip_resizedcrop` for SLAKE, MedVQA-2019, CheXpert, RSNA, ROCO; VQA-RAD plain `clip`).
"""
from __future__ import annotations

import ml_collections

from experiments import ptunifier
from experiments._common import base_config


def finetune_config(variant: str, task: str, *, file: str, demo_file: str, max_text_len: int, batch_size: int,
                    steps: int, head_multiplier: float, multi_modal_multiplier: float,
                    resized_crop: bool = True, epochs: int = 0, **finetune) -> ml_collections.ConfigDict:
    """The config of the registered fine-tuning `task` (medjax.tasks.TASKS, e.g. "ptunifier_vqa") at
    `variant` ("full" or a named paper dataset variant: the given settings; "demo" / "tiny": the demo
    dataset and the demo / tiny backbone); `finetune` (the task's own settings) becomes the `finetune`
    block when given. `epochs`: the original's max_epoch, which `steps` spans; the paper variants validate
    on `val` once per epoch (train.eval_every = steps / epochs, Lightning's default) and keep the best
    checkpoint by the task's selection metric (the original's ModelCheckpoint(monitor="val/the_metric"))."""
    size = variant if variant in ("demo", "tiny") else "full"
    pretrain = ptunifier.get_config(size)
    c = base_config()
    c.task = task
    c.variant = variant
    c.freeze_prompt_pools = True  # released code: pools requires_grad=False outside pretraining
    c.resize_position_table_at_load = True  # released code: adapt_position_encoding once, table then trained
    if finetune:
        c.finetune = ml_collections.ConfigDict(finetune)
    c.data.update(dict(
        dir="",  # the folder holding `file` (and tokenizer/); "" = the image-report demo dataset in the cache
        kind="image_report",
        file=file,  # JSONL manifest or the original's Arrow file; "{split}" is replaced by the split
        train_split="train", eval_split="test",
        val_split="val",  # what train.eval_every validates on (the best-validation checkpoint), never the test split
        tokenizer="",  # a local Hugging Face tokenizer directory (BioMed-RoBERTa's); "" = <dir>/tokenizer
        image_size=384,  # fine-tuning resolution (paper)
        max_text_len=max_text_len,
        resized_crop=bool(resized_crop),  # clip_resizedcrop (RandomResizedCrop 0.9-1) for training images
    ))
    c.model = pretrain.model.copy_and_resolve_references()
    c.train.update(dict(steps=steps, batch_size=batch_size, log_every=50, checkpoint_every=1000, eval_batch_size=64,
                        eval_every=max(1, steps // epochs) if epochs else 0))
    c.optim.update(dict(lr=5e-6, schedule="linear", warmup_steps=0, warmup_fraction=0.1, weight_decay=0.01,
                        b1=0.9, b2=0.98, eps=1e-8, clip_norm=0.0))
    # the original's lr_multiplier_head / lr_multiplier_multi_modal, by top-level name prefix (its head_names
    # and multi-modal names)
    c.optim.lr_mults = ptunifier.ptunifier_lr_mults(
        head_multiplier, multi_modal_multiplier, heads=r"^(mlm_|itm_|itc_|task_head)[^/]*(/|$)",
        multi_modal_params=r"^(text_proj|image_proj|fusion_|text_pooler|image_pooler|visual_prompts|textual_prompts)[^/]*(/|$)")
    c.optim.wd_mults = ptunifier.PTUNIFIER_WD_MULTS
    if variant == "demo":
        c.data.update(dict(file=demo_file, image_size=pretrain.model.image_size, max_text_len=pretrain.data.max_length))
        c.train.update(dict(steps=80, batch_size=16, log_every=10, checkpoint_every=40, eval_batch_size=32,
                            eval_every=0))
        c.optim.lr = 1e-4
    elif variant == "tiny":
        c.data.update(dict(file=demo_file, image_size=pretrain.model.image_size, max_text_len=pretrain.data.max_length))
        c.train.update(dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8, eval_every=0))
        c.optim.lr = 1e-3
    return c
