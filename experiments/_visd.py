"""ViSD-Boost's three training stages (Cao et al., "Boosting Vision Semantic Density with Anatomy Normality
Modeling for Medical Vision-language Pre-training", ICCV 2025; alibaba-damo-academy/ViSD-Boost) as configs:
`visd_config(stage, variant)` for experiments/visd_stage1_vse.py, visd_stage2_vqvae.py, visd_stage3_vlp.py
(and visd_ctrate.py, the evaluation of stage 3's model). The data and text tower are fVLM's
(experiments/fvlm_ctrate.py); what differs is the vision side (medjax.models.visd) and the stage.

From the released model: MedicalNet ResNet-18 (shortcut A), stage projections to 256, one shared 4-head
attention with per-organ queries and projections to 256, VQ-VAE 256 -> 768 (2 layers, 16 heads x 64, MLP 2048,
dropout 0.1), codebook 4 x 100 EMA (decay 0.99, eps 1e-5, commitment 0.25), momentum 0.995, temperature 0.07,
CXR-BERT at 384 tokens. The paper's numbers of epochs and learning rates per stage are not in the released
code; our choices, marked: stage 1 and 2 of 10 and 5 fVLM-sized epochs (842 steps of batch 56), stage 3 fVLM's
recipe (AdamW 1e-4, 377 warmup steps, cosine, 20 epochs); vision-semantic temperature 0.07 (fixed); the
original's detached shortcut gradient is off (model.detach_shortcut=True restores it).
"""
from __future__ import annotations

import ml_collections

from experiments import fvlm_ctrate

# ViSD-Boost's eval.py prompts ("Not <name>." / "<name>."), per CT-RATE column (fVLM's CT_RATE_LABELS order)
VISD_PROMPTS = ("Emphysema", "Atelectatic", "Lung nodule", "Lung opacity", "Pulmonary fibrotic", "Pleural effusion",
                "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                "Interlobular septal thickening", "Cardiomegaly", "Pericardial effusion",
                "Coronary artery wall calcification", "Hiatal hernia", "Arterial wall calcification")
VISD_LABELS = tuple((column, organ, name) for (column, organ, _), name in zip(fvlm_ctrate.CT_RATE_LABELS, VISD_PROMPTS))
STAGES = {"vse": 8420, "vqvae": 4210, "vlp": 16840}  # full-size steps (842 per CT-RATE epoch of batch 56)
STATE = r"^(batch_stats|codebook|momentum)/"  # written by the task's post_update, never by the optimizer
FROZEN = {
    "vse": [STATE, r"^model/(text|text_proj|temp)(/|$)", r"^model/vision/vqvae/"],  # vision only, no VQ-VAE yet
    "vqvae": [STATE, r"^model/(?!vision/vqvae/)"],  # only the normality model
    "vlp": [STATE, r"^model/vision/vqvae/"],  # everything but the (frozen) normality model
}


def visd_config(stage: str, variant: str = "full") -> ml_collections.ConfigDict:
    c = fvlm_ctrate.get_config("full")
    c.task = "visd"
    c.variant = variant
    c.stage = stage
    c.model = ml_collections.ConfigDict(dict(
        depth=18, width=64, shortcut_type="A", detach_shortcut=False,  # MedicalNet ResNet-18 (medjax.nn.resnet3d)
        token_dim=256, pool_heads=4, embed_dim=256, dropout=0.1,
        vq=dict(dim=768, depth=2, num_heads=16, head_dim=64, mlp_dim=2048, dropout=0.1, codes_per_organ=100,
                decay=0.99, epsilon=1e-5, commitment_cost=0.25, data_variance=0.5),
        text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072, max_positions=512,  # CXR-BERT (BERT-base)
        vocab_size=0, init_text="",
    ))
    c.loss.update(dict(vse_temperature=0.07, momentum=0.995))
    c.train.steps = STAGES[stage]
    c.optim.frozen = FROZEN[stage]
    c.eval.labels = VISD_LABELS
    # the released eval's organ-centred windows (medjax.tasks.visd_data), 112 x 288 x 352 as fVLM's eval;
    # eval.windows="centre" scores fVLM's centre crop instead
    c.eval.update(dict(windows="organ", window_shape=(112, 288, 352), min_organ_fraction=0.9))

    if variant == "demo":
        c.data.update(dict(crop_shape=(16, 64, 64), max_length=24))
        c.model.update(dict(width=8, token_dim=32, embed_dim=32, dropout=0.0, text_width=64, text_depth=2,
                            text_heads=4, text_mlp_dim=128, max_positions=32))
        c.model.vq.update(dict(dim=64, num_heads=4, head_dim=16, mlp_dim=128, dropout=0.0, codes_per_organ=16))
        c.eval.update(dict(labels=fvlm_ctrate.DEMO_LABELS, window_shape=(16, 64, 64)))
        c.train.update(dict(steps={"vse": 60, "vqvae": 60, "vlp": 80}[stage], batch_size=8 if stage == "vse" else 16,
                            log_every=1, checkpoint_every=20, eval_batch_size=8))  # vse: 8 scans x 2 views
        c.optim.update(dict(lr=5e-4, warmup_steps=10, min_lr=1e-5))
        c.loss.momentum = 0.9  # 60 steps: a 0.995 momentum encoder would stay at its random init
        c.loss.init_temperature = 0.3  # as fvlm_ctrate's demo: from scratch, 0.07 collapses both towers
    elif variant == "tiny":
        c.data.update(dict(crop_shape=(16, 32, 32), max_length=12))
        c.model.update(dict(depth=10, width=4, token_dim=16, embed_dim=8, dropout=0.0, text_width=32, text_depth=1,
                            text_heads=4, text_mlp_dim=64, max_positions=16))
        c.model.vq.update(dict(dim=16, depth=1, num_heads=2, head_dim=8, mlp_dim=32, dropout=0.0, codes_per_organ=2))
        c.eval.update(dict(labels=fvlm_ctrate.DEMO_LABELS, window_shape=(16, 32, 32)))
        c.train.update(dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=4))
        c.optim.update(dict(lr=1e-3, warmup_steps=1, min_lr=0.0))
    elif variant != "full":
        raise ValueError(f"visd_{stage}: unknown variant {variant!r}; choose full, demo or tiny")
    return c
