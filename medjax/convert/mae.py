"""A 2D MAE ViT-B checkpoint (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022;
facebookresearch/mae `mae_pretrain_vit_base.pth`) -> the 3D ViT of fVLM (Shui et al., ICLR 2025), the
initialisation fVLM trains from.

    python -m medjax.convert mae --torch mae_pretrain_vit_base.pth --out params/mae_fvlm [--variant full]
    python -m medjax.train --exp fvlm_ctrate --variant full --data DIR --set init=params/mae_fvlm \
        --set model.init_text=BiomedVLP-CXR-BERT-specialized/ --set data.tokenizer=BiomedVLP-CXR-BERT-specialized/

The file is `{"model": state_dict}` (MAE's release; a bare state dict or `.safetensors` is read too) with
timm's VisionTransformer key names, which MAE's encoder uses: `patch_embed.proj`, `cls_token`, `pos_embed`
(1, 1 + 14 x 14, 768, the fixed sin-cos table with the [CLS] row), `blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}`, `norm`. What goes where (fVLM's recipe, ../shared/reference/visd_boost.md):
- `blocks.{i}.*` -> vision/blocks_{i} (fused qkv split into the query / key / value heads; nn.Linear
  (out, in) -> Dense kernel (in, out)); `norm` -> vision/norm;
- `pos_embed` -> vision/pos_embed by `medjax.models.fvlm.pos_embed_from_2d`: the [CLS] row dropped, the 14 x 14
  grid resized bicubically to the (H', W') of the 3D patch grid (16 x 11 for 256 x 352 / (16, 32)) and repeated
  D' (7) times in depth;
- `patch_embed.proj` is not used: fVLM trains its 3D patch embedding (16, 16, 32) over one CT channel from
  scratch, so vision/patch_embed is left to the model's initialisation (listed as "not in the checkpoint");
- ignored: `cls_token` (fVLM's ViT has none), MAE's decoder (`decoder_*`, `mask_token`) and any classifier
  (`head.*`, `fc_norm.*`) of a fine-tuned file.
The written params hold only {"vision": ...}: `--set init=OUT` fills those leaves and keeps everything else
(organ pooling, text tower, projections, temperature) as initialised; with `model.init_text` the text tower
still comes from that Hugging Face directory (medjax.tasks.fvlm.FVLMTask.load_pretrained).
The target is the `fvlm_ctrate` config of `variant` (`overrides` as `--set`); the checkpoint's width, depth and
MLP width must equal the config's (a mismatch names the config field); the heads are the config's.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert import torch_io
from medjax.convert import uni as convert_uni
from medjax.convert.torch_io import KeyReport, ParamMap
from medjax.models.fvlm import pos_embed_from_2d, volume_vit_from_config

IGNORE = (r"patch_embed\.proj\.(weight|bias)",  # fVLM's 3D patch embedding starts from scratch
          r"cls_token", r"mask_token", r"decoder_.*", r"head\.(weight|bias)", r"fc_norm\.(weight|bias)")
LEFT_TO_INIT = ("patch_embed",)  # VolumeViT params not taken from the checkpoint
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def volume_vit(variant: str = "full", overrides: Sequence[str] = ()):
    """The 3D ViT (`medjax.models.fvlm.VolumeViT`) of `fvlm_ctrate`'s config, as the task builds it."""
    from medjax import config as config_lib

    config = config_lib.get_config("fvlm_ctrate", variant, overrides)
    return volume_vit_from_config(config.model, config.data.crop_shape)


def param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of a VolumeViT, abstractly (nothing allocated)."""
    volumes = jax.ShapeDtypeStruct((1,) + tuple(model.volume_shape) + (1,), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), volumes)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _grid_2d(state: Mapping[str, np.ndarray], source: str) -> tuple[int, int]:
    positions = np.shape(state["pos_embed"])[1] - 1
    side = int(round(max(positions, 0) ** 0.5))
    if side * side != positions:
        raise ValueError(f"{source}: pos_embed {np.shape(state['pos_embed'])} is not [CLS] + a square patch grid "
                         "(MAE's (1, 1 + 14 x 14, 768))")
    return side, side


def check_architecture(model, state: Mapping[str, np.ndarray], source: str) -> None:
    """The checkpoint's ViT against the config's (width, depth, MLP width), naming the config field. The heads are
    not in the weights: the config's `model.num_heads` (12 of 64 for ViT-B, as MAE) splits the projections."""
    for key in ("pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"{source}: no {key!r}; expected an MAE / timm ViT state dict (keys pos_embed, "
                             f"patch_embed.proj.weight, blocks.N.attn.qkv.weight, ..., norm.weight), found "
                             f"{sorted(state)[:6]}...")
    width = int(np.shape(state["pos_embed"])[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    found = {"width": width, "depth": depth, "mlp_dim": int(np.shape(state["blocks.0.mlp.fc1.weight"])[0])}
    for field, value in found.items():
        if getattr(model, field) != value:
            raise ValueError(f"{source}: the checkpoint's ViT has {field}={value} (MAE ViT-B: width 768, depth 12, "
                             f"MLP 3072) but the fVLM config has model.{field}="
                             f"{getattr(model, field)}; convert for a config that matches (--variant / --set)")


def mae_map(model, shapes, grid_2d: tuple[int, int]) -> dict[str, ParamMap]:
    """MAE keys (fused qkv already split into attn.q / attn.k / attn.v) -> VolumeViT param paths."""
    cp = torch_io.copy_param
    rows, cols = grid_2d
    entries = {"pos_embed": ParamMap(("pos_embed",), (1, 1 + rows * cols, model.width),
                                     lambda a: pos_embed_from_2d(a, grid_2d, model.grid))}
    for i in range(model.depth):
        src, dst = f"blocks.{i}", (f"blocks_{i}",)
        entries |= torch_io.layer_norm_params(f"{src}.norm1", dst + ("norm1",), shapes)
        entries |= torch_io.attention_params(convert_uni.timm_qkv_names(i), dst + ("attn",), shapes)
        entries |= torch_io.layer_norm_params(f"{src}.norm2", dst + ("norm2",), shapes)
        entries |= torch_io.linear_params(f"{src}.mlp.fc1", dst + ("mlp", "fc1"), shapes)
        entries |= torch_io.linear_params(f"{src}.mlp.fc2", dst + ("mlp", "fc2"), shapes)
    entries["norm.weight"], entries["norm.bias"] = cp(("norm", "scale"), shapes), cp(("norm", "bias"), shapes)
    return entries


def convert_state_dict(state: Mapping[str, np.ndarray], model, source: str = "checkpoint") -> tuple[dict, KeyReport]:
    """An MAE state dict -> ({"vision": VolumeViT params without the patch embedding}, key report)."""
    state = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()}
    check_architecture(model, state, source)
    shapes = param_shapes(model)
    mapped = {k: s for k, s in shapes.items() if k[0] not in LEFT_TO_INIT}
    mapping = mae_map(model, mapped, _grid_2d(state, source))
    expected = convert_uni.timm_checkpoint_shapes(model, mapping)
    report = torch_io.check_keys(expected, {k: tuple(np.shape(v)) for k, v in state.items()}, ignore=IGNORE)
    report = dataclasses.replace(report, absent=tuple("vision/" + "/".join(k) for k in sorted(set(shapes) - set(mapped))))
    report.raise_if_problems(f"{source} (MAE ViT -> fVLM 3D ViT, width {model.width}, depth {model.depth})")
    used = {k: v for k, v in state.items() if k not in report.ignored}
    params, _ = torch_io.apply_mapping(mapped, mapping, torch_io.split_fused_qkv(used, (f"blocks.{i}" for i in range(model.depth))), source)
    return {"vision": params}, report


def load_with_report(path: str, variant: str = "full", overrides: Sequence[str] = ()) -> tuple[dict, KeyReport]:
    """`convert_state_dict` of the file at `path` for `fvlm_ctrate`'s `variant` config (module docstring)."""
    from medjax.convert.visd import read_released

    return convert_state_dict(read_released(path), volume_vit(variant, overrides), path)
