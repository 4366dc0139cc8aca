"""The rows of `python -m medjax.bench vs-torch`: per experiment, the same architecture with the same random
weights in medjax and in its PyTorch reference, and the same loss on the same random batch.

- universal_swin / universal_unet (Liu et al., ICCV 2023): `medjax.convert.torch_universal` (MONAI's
  SwinUNETR with the legacy PatchMerging / the Models-Genesis UNet3D + the original head) -> the weights
  through `medjax.convert.universal`; loss BCE + Dice over every class (Sec. 3.3, all classes labelled),
  crops of `data.crop_size` (96^3 in the paper). Outputs compared: the logits.
- uni_vitl16 (Chen et al., Nat. Med. 2024): timm `vit_large_patch16_224` as UNI builds it (LayerScale
  1e-5, no classifier) + DINOv2's DINOHead (3-layer MLP 1024-2048-2048-256, L2 normalisation, weight-
  normalised 256 -> 65536 prototypes), the backbone through `medjax.convert.uni`, the head copied; loss
  the DINO cross-entropy of the student's prototypes (temperature 0.1) against a fixed random teacher
  distribution, on `global_size` crops. Outputs compared: the prototype logits. (The rest of DINOv2's
  step - the EMA teacher's forward, local crops, iBOT, KoLeo - is not in this row.)
- pathchat (PathChat's LLM, Llama 2; the experiment's `model` width/depth/heads/mlp): transformers'
  `LlamaForCausalLM` saved with `save_pretrained` and read back by `medjax.convert.hf_llama`; loss the
  next-token cross-entropy on random tokens. Outputs compared: the logits.
- ptunifier (Chen et al., ICCV 2023): the PyTorch restatement of the released `PTUnifierTransformerSS`
  (`medjax.convert.torch_ptunifier`) -> `medjax.convert.ptunifier`; MLM + ITM on image + text (`ptunifier_row`).
- mrm_retina / mrm_mae_baseline (Yang et al., ICCV 2023): the authors' MAE, timm `vit_base_patch16_224` + the
  512 x 8 decoder (`medjax.convert.torch_mae`) -> `medjax.convert.mrm_mae`; same masking on both sides (`mae_row`).

The builders live by family: `torch_rows_volume` (Universal), `torch_rows_vit` (UNI, MAE), `torch_rows_text`
(PathChat's Llama, PTUnifier). Each returns a `medjax.bench.row_sides.RowSides`; a side is only built when
asked for (the memory children build one).
"""
from __future__ import annotations

from typing import Callable

from medjax.bench.row_sides import RowSides
from medjax.bench.step_pair import ADAMW
from medjax.bench.torch_rows_text import pathchat_row, ptunifier_row
from medjax.bench.torch_rows_vit import mae_row, uni_row
from medjax.bench.torch_rows_volume import universal_row
from medjax.errors import MedjaxInputError

_WHERE = "medjax/bench/torch_rows.py"


ROWS: dict[str, Callable[..., RowSides]] = {
    "universal_swin": universal_row,
    "universal_unet": universal_row,
    "uni_vitl16": uni_row,
    "pathchat_stage1": pathchat_row,
    "pathchat_stage2": pathchat_row,
    "ptunifier": ptunifier_row,
    "mrm_retina": mae_row,
    "mrm_mae_baseline": mae_row,
}
NOT_YET: dict[str, str] = {}  # experiment -> why it has no row yet (named in the error)


def build_row(exp: str, config, batch_size: int, sides: tuple[str, ...], *, seq_len: int = 256) -> RowSides:
    """The row for experiment `exp` (a clear error for the experiments without one); `seq_len`: tokens of the
    language-model rows."""
    if exp not in ROWS:
        reason = NOT_YET.get(exp, "no PyTorch reference is wired for it")
        raise MedjaxInputError(f"{_WHERE}: --exp {exp!r} has no vs-torch row ({reason}); rows: {', '.join(ROWS)}")
    if ROWS[exp] is pathchat_row:
        return pathchat_row(config, batch_size, sides, seq_len=seq_len)
    return ROWS[exp](config, batch_size, sides)


__all__ = ["ADAMW", "ROWS", "RowSides", "build_row", "mae_row", "pathchat_row", "ptunifier_row",
           "uni_row", "universal_row"]
