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

Each builder returns a `RowSides`; a side is only built when asked for (the memory children build one).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import numpy as np

from medjax.bench.step_pair import ADAMW, StepSide, jax_side, torch_side
from medjax.errors import MedjaxInputError

_WHERE = "medjax/bench/torch_rows.py"


@dataclasses.dataclass
class RowSides:
    """The sides built for one row, a description of the shapes, and how the weights were shared."""

    sides: dict[str, StepSide]
    shapes: str
    weights: str


def _torch():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


# ---------------------------------------------------------------------------------------- Universal Model

def _bce_dice_torch(logits, labels, smooth: float):
    """The original's Multi_BCELoss + DiceLoss over every (sample, class) (`medjax.losses.segmentation`):
    logits, labels (b, classes, X, Y, Z)."""
    import torch
    from torch.nn import functional

    spatial = (2, 3, 4)
    bce = functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(spatial)
    probs = torch.sigmoid(logits)
    dice = 1 - 2 * (probs * labels).sum(spatial) / (probs.sum(spatial) + labels.sum(spatial) + smooth)
    return bce.mean() + dice.mean()


def universal_row(config, batch_size: int, sides: tuple[str, ...]) -> RowSides:
    import jax.numpy as jnp

    from medjax.convert import torch_universal
    from medjax.convert import universal as convert_universal
    from medjax.losses.segmentation import partial_label_bce_dice

    torch = _torch()
    m = config.model
    crop = tuple(int(s) for s in config.data.crop_size)
    classes = int(m.num_classes)
    smooth = float(config.loss.dice_smooth)
    if m.backbone == "swinunetr" and min(crop) < 64:
        raise MedjaxInputError(
            f"{_WHERE}: data.crop_size={crop}: MONAI's SwinUNETR trains only on crops of at least 64 voxels a side "
            "(its InstanceNorm at 1/32 scale needs more than one voxel); pass --set 'data.crop_size=(64, 64, 64)'")
    torch.manual_seed(int(config.seed))
    net = torch_universal.universal_torch(m.backbone, feature_size=int(m.feature_size), num_classes=classes,
                                          encoding=m.encoding, norm_groups=int(m.norm_groups),
                                          legacy_merging=bool(m.legacy_merging))
    rng = np.random.default_rng(0)
    image = rng.standard_normal((batch_size, 1, *crop), dtype=np.float32)
    labels = (rng.random((batch_size, classes, *crop)) < 0.1).astype(np.float32)
    built = {}
    if "medjax" in sides:
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        model, variables, _ = convert_universal.convert_state_dict(
            state, m.backbone, source="random PyTorch weights", norm_groups=int(m.norm_groups),
            legacy_merging=bool(m.legacy_merging), kernel_impl=config.kernels.impl)
        if bool(m.get("remat", False)) and m.backbone == "swinunetr":
            model = model.clone(backbone=model.backbone.clone(remat=True))
        constants = {k: v for k, v in variables.items() if k != "params"}
        batch = {"image": jnp.asarray(image.transpose(0, 2, 3, 4, 1)),
                 "label": jnp.asarray(labels.transpose(0, 2, 3, 4, 1).astype(np.uint8)),
                 "label_mask": jnp.ones((batch_size, classes), bool)}

        def loss_fn(params, batch):
            logits = model.apply({"params": params, **constants}, batch["image"], train=True)
            return partial_label_bce_dice(logits, batch["label"], batch["label_mask"], smooth=smooth)[0]

        def forward_fn(params, batch):  # channels first, as the original
            return jnp.moveaxis(model.apply({"params": params, **constants}, batch["image"]), -1, 1)

        built["medjax"] = jax_side(loss_fn, forward_fn, variables["params"], batch)
    if "torch" in sides:
        x, y = torch.from_numpy(image), torch.from_numpy(labels)
        built["torch"] = torch_side(net, lambda module: _bce_dice_torch(module(x), y, smooth),
                                    lambda module: module(x).numpy())
    shapes = f"batch {batch_size} x {crop}, {m.backbone} (feature {m.feature_size}), {classes} classes"
    return RowSides(built, shapes, "same random weights (PyTorch -> medjax.convert.universal)")


# ---------------------------------------------------------------------------------------- UNI (DINOv2)

def _dino_head_torch(width: int, hidden: int, bottleneck: int, out_dim: int, layers: int):
    """DINOv2's `dinov2/layers/dino_head.py` DINOHead: MLP (GELU), F.normalize, weight_norm(Linear, no bias)."""
    import torch
    from torch import nn

    class DINOHead(nn.Module):
        def __init__(self):
            super().__init__()
            dims = [width] + [hidden] * (layers - 1) + [bottleneck]
            mods = []
            for i in range(layers):
                mods.append(nn.Linear(dims[i], dims[i + 1]))
                if i < layers - 1:
                    mods.append(nn.GELU())
            self.mlp = nn.Sequential(*mods)
            self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

        def forward(self, x):
            x = nn.functional.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
            return self.last_layer(x)

    torch.manual_seed(1)
    return DINOHead()


def _dino_head_params(head, layers: int) -> dict:
    """The torch DINOHead's weights as `medjax.models.dinov2.DINOHead` params (kernel = weight.T)."""
    linears = [m for m in head.mlp if hasattr(m, "weight")]
    params = {f"mlp_{i}": {"kernel": lin.weight.detach().numpy().T.copy(), "bias": lin.bias.detach().numpy().copy()}
              for i, lin in enumerate(linears)}
    assert len(linears) == layers
    weight_norm = head.last_layer.parametrizations.weight
    params["last_layer"] = {"kernel": weight_norm.original1.detach().numpy().T.copy(),
                            "gain": weight_norm.original0.detach().numpy()[:, 0].copy()}
    return params


def uni_row(config, batch_size: int, sides: tuple[str, ...]) -> RowSides:
    import jax
    import jax.numpy as jnp
    import timm
    from safetensors.torch import save_file

    from medjax.convert import uni as convert_uni
    from medjax.models.dinov2 import DINOHead

    torch = _torch()
    m, h = config.model, config.head
    size = int(config.crops.global_size)
    temp = float(config.dino.student_temp)
    torch.manual_seed(int(config.seed))
    backbone = timm.create_model(f"vit_large_patch{int(m.patch_size)}_224", pretrained=False, num_classes=0,
                                 init_values=float(m.layerscale_init), img_size=size, embed_dim=int(m.width),
                                 depth=int(m.depth), num_heads=int(m.num_heads), mlp_ratio=float(m.mlp_ratio))
    head = _dino_head_torch(int(m.width), int(h.hidden_dim), int(h.bottleneck_dim), int(h.out_dim), int(h.num_layers))
    net = torch.nn.Sequential(backbone, head)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, size, size), dtype=np.float32)
    teacher = rng.random((batch_size, int(h.out_dim)), dtype=np.float32)
    teacher /= teacher.sum(-1, keepdims=True)
    built = {}
    if "medjax" in sides:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.safetensors")
            save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, path)
            encoder, variables = convert_uni.load(path, image_size=size, patch_size=int(m.patch_size),
                                                  width=int(m.width), depth=int(m.depth), num_heads=int(m.num_heads),
                                                  mlp_ratio=float(m.mlp_ratio), layerscale_init=float(m.layerscale_init),
                                                  remat=m.remat)
        dino = DINOHead(int(h.out_dim), int(h.hidden_dim), int(h.bottleneck_dim), int(h.num_layers), learn_gain=True)
        params = {"backbone": variables["params"], "head": jax.tree.map(jnp.asarray, _dino_head_params(head, int(h.num_layers)))}
        batch = {"images": jnp.asarray(images.transpose(0, 2, 3, 1)), "teacher": jnp.asarray(teacher)}

        def prototypes(params, batch, train):
            features = encoder.apply({"params": params["backbone"]}, batch["images"], train=train)
            return dino.apply({"params": params["head"]}, features)

        def loss_fn(params, batch):
            logits = prototypes(params, batch, True)
            return -jnp.mean(jnp.sum(batch["teacher"] * jax.nn.log_softmax(logits / temp, -1), -1))

        built["medjax"] = jax_side(loss_fn, lambda p, b: prototypes(p, b, False), params, batch)
    if "torch" in sides:
        x, t = torch.from_numpy(images), torch.from_numpy(teacher)

        def loss_torch(module):
            logits = module(x)
            return -(t * torch.log_softmax(logits / temp, -1)).sum(-1).mean()

        built["torch"] = torch_side(net, loss_torch, lambda module: module(x).numpy())
    shapes = (f"batch {batch_size} x {size}^2, ViT {m.width}x{m.depth} /{m.patch_size} + DINO head "
              f"{h.hidden_dim}-{h.bottleneck_dim}-{h.out_dim}")
    return RowSides(built, shapes, "same random weights (timm -> medjax.convert.uni; head copied)")


# ---------------------------------------------------------------------------------------- PathChat's Llama

def pathchat_row(config, batch_size: int, sides: tuple[str, ...], seq_len: int = 256) -> RowSides:
    import jax.numpy as jnp
    import optax
    import transformers

    from medjax.convert import hf_llama

    torch = _torch()
    m = config.model
    vocab = int(m.vocab_size) or 32000  # 0 in the small variants: the tokenizer's; Llama 2's 32000 here
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=int(m.width), intermediate_size=int(m.mlp_dim),
        num_hidden_layers=int(m.depth), num_attention_heads=int(m.num_heads),
        num_key_value_heads=int(m.num_kv_heads) or int(m.num_heads), max_position_embeddings=max(seq_len, 4096),
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(int(config.seed))
    net = transformers.LlamaForCausalLM(hf_config).float()
    tokens = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int64)
    built = {}
    if "medjax" in sides:
        with tempfile.TemporaryDirectory() as directory:
            net.save_pretrained(directory, safe_serialization=True)
            model, variables, _ = hf_llama.load_with_report(directory)
        model = model.clone(remat=m.get("remat", "none")) if "remat" in m else model
        batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}

        def loss_fn(params, batch):
            logits = model.apply({"params": params}, batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        built["medjax"] = jax_side(loss_fn, lambda p, b: model.apply({"params": p}, b["inputs"]),
                                   variables["params"], batch)
    if "torch" in sides:
        x, y = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])

        def loss_torch(module):
            logits = module(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

        built["torch"] = torch_side(net, loss_torch, lambda module: module(input_ids=x).logits.numpy())
    shapes = (f"batch {batch_size} x {seq_len} tokens, Llama {m.width}x{m.depth}, {m.num_heads} heads, "
              f"MLP {m.mlp_dim}, vocab {vocab}")
    return RowSides(built, shapes, "same random weights (transformers save_pretrained -> medjax.convert.hf_llama)")


ROWS: dict[str, Callable[..., RowSides]] = {
    "universal_swin": universal_row,
    "universal_unet": universal_row,
    "uni_vitl16": uni_row,
    "pathchat_stage1": pathchat_row,
    "pathchat_stage2": pathchat_row,
}
NOT_YET = {
    "ptunifier": "its PyTorch reference (the parity restatement) lives in tests/convert/test_ptunifier_parity.py, "
                 "not in the package",
    "mrm_retina": "no converter maps a timm MAE ViT-B + 512x8 decoder onto medjax's MRM model yet",
}


def build_row(exp: str, config, batch_size: int, sides: tuple[str, ...], *, seq_len: int = 256) -> RowSides:
    """The row for experiment `exp` (a clear error for the experiments without one); `seq_len`: tokens of the
    language-model rows."""
    if exp not in ROWS:
        reason = NOT_YET.get(exp, "no PyTorch reference is wired for it")
        raise MedjaxInputError(f"{_WHERE}: --exp {exp!r} has no vs-torch row ({reason}); rows: {', '.join(ROWS)}")
    if ROWS[exp] is pathchat_row:
        return pathchat_row(config, batch_size, sides, seq_len=seq_len)
    return ROWS[exp](config, batch_size, sides)


__all__ = ["ADAMW", "ROWS", "RowSides", "build_row"]
