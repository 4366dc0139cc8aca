"""METER's released PyTorch Lightning checkpoint (zdou0830/METER, `METERTransformerSS`; e.g.
`meter_clip16_288_roberta_pretrain.ckpt`) -> `medjax.models.ptunifier.PTUnifier` params, to initialise
PTUnifier pretraining from METER as PTUnifier's architecture is METER's plus the prompt pools and ITC:

    python -m medjax.convert meter meter_clip16_288_roberta_pretrain.ckpt --out params/meter
    python -m medjax.train --exp ptunifier --variant full --data DIR --set init=params/meter

PTUnifier (zhjohnchan/PTUnifier, `PTUnifierTransformerSS`) renamed METER's modules; the two state dicts
differ only by these prefixes (METER's name -> PTUnifier's):

    vit_model.                    -> vision_encoder.              (METER's CLIP: `visual` + text-side leftovers)
    text_transformer.             -> language_encoder.            (HF RobertaModel / BertModel, pooler unused)
    cross_modal_text_transform    -> multi_modal_language_proj
    cross_modal_image_transform   -> multi_modal_vision_proj
    token_type_embeddings         -> modality_type_embeddings
    cross_modal_text_layers.{i}   -> multi_modal_language_layers.{i}   (the same BertCrossLayer)
    cross_modal_image_layers.{i}  -> multi_modal_vision_layers.{i}
    cross_modal_text_pooler       -> multi_modal_language_pooler
    cross_modal_image_pooler      -> multi_modal_vision_pooler
    mlm_score                     -> mlm_head
    itm_score                     -> itm_head

so the keys are renamed and converted by `medjax.convert.ptunifier.convert_state_dict`. What METER lacks
(the ITC head, the two prompt pools, and in a METER fine-tuned checkpoint its MLM / ITM heads) is left out
of the written params and listed in the report; `--set init=DIR` keeps the pretraining model's fresh
initialisation for those (N(0, 0.02) pools, as PTUnifier's). METER's task heads (`vqa_classifier`,
`nlvr2_classifier`, `snli_classifier`, `rank_output`) are not PTUnifier's and are skipped (listed as
ignored). The Swin-backbone METER checkpoints are refused by name: PTUnifier's image tower is CLIP's ViT.
The vision position table is resized bicubically to `image_size` when one is given (METER pretrains at
288, as PTUnifier; `adapt_position_encoding`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from medjax.convert import ptunifier
from medjax.convert.torch_io import KeyReport
from medjax.models.ptunifier import PTUNIFIER_FULL, PTUnifier

Dtype = Any
RENAMES = (  # METER prefix -> PTUnifier prefix (first match wins)
    ("vit_model.", "vision_encoder."),
    ("text_transformer.", "language_encoder."),
    ("cross_modal_text_transform.", "multi_modal_language_proj."),
    ("cross_modal_image_transform.", "multi_modal_vision_proj."),
    ("token_type_embeddings.", "modality_type_embeddings."),
    ("cross_modal_text_layers.", "multi_modal_language_layers."),
    ("cross_modal_image_layers.", "multi_modal_vision_layers."),
    ("cross_modal_text_pooler.", "multi_modal_language_pooler."),
    ("cross_modal_image_pooler.", "multi_modal_vision_pooler."),
    ("mlm_score.", "mlm_head."),
    ("itm_score.", "itm_head."),
)
# PTUnifier's parts METER does not have (pretraining: ITC and the pools; fine-tuned METER: no MLM / ITM head)
ABSENT = (r"itc_head\..*", r"pseudo_vision_token_pool", r"pseudo_language_token_pool", r"mlm_head\..*",
          r"itm_head\..*")
IGNORED = (r"(vqa_classifier|nlvr2_classifier|snli_classifier|rank_output)\..*",)  # METER's task heads


def ptunifier_state_from_meter(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """METER's state dict with PTUnifier's key names (RENAMES); refuses a Swin-backbone METER checkpoint."""
    if "vit_model.visual.conv1.weight" not in state:
        swin = any(k.startswith("vit_model.layers.") or k.startswith("vit_model.patch_embed.") for k in state)
        what = "a Swin-backbone METER checkpoint" if swin else "not a METER CLIP-ViT checkpoint"
        raise ValueError(f"{source}: key 'vit_model.visual.conv1.weight' is missing ({what}); PTUnifier's image "
                         "tower is CLIP's ViT: use a METER-CLIP16 checkpoint (e.g. meter_clip16_288_roberta_pretrain.ckpt)")
    out = {}
    for key, value in state.items():
        new = next((to + key[len(frm):] for frm, to in RENAMES if key.startswith(frm)), key)
        out[new] = value
    return out


def load_with_report(path: str, *, trust_pickle: bool = False, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32, **overrides) -> tuple[PTUnifier, dict, KeyReport]:
    """(the PTUnifier model, {"params": what METER's checkpoint holds of it}, the key report); `overrides` of
    PTUNIFIER_FULL's fields (head counts, pool_size, image_size, ...) and `scan`."""
    state = ptunifier_state_from_meter(ptunifier.read_lightning_state_dict(path, trust_pickle=trust_pickle), path)
    unknown = sorted(set(overrides) - set(PTUNIFIER_FULL) - {"scan"})
    if unknown:
        raise ValueError(f"medjax/convert/meter.py: unknown model field(s) {unknown}; "
                         f"fields: {sorted(PTUNIFIER_FULL) + ['scan']}")
    fields = {**PTUNIFIER_FULL, **ptunifier.config_from_state_dict(state, path), **overrides}
    model = PTUnifier(**fields, dtype=dtype, param_dtype=param_dtype)
    params, report = ptunifier.convert_state_dict(state, model, path, param_dtype=param_dtype, absent=ABSENT,
                                                  ignore=IGNORED)
    return model, {"params": params}, report
