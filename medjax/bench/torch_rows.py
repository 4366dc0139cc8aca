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


# ---------------------------------------------------------------------------------------- PTUnifier

def _ptunifier_dims(m, vocab: int):
    """The restatement's `Dims` at the experiment's `model` shapes (it has one width and one head count)."""
    from medjax.convert.torch_ptunifier import Dims

    widths = {int(m.vision_width), int(m.text_width), int(m.hidden_size)}
    heads = {int(m.vision_heads), int(m.text_heads), int(m.fusion_heads)}
    if len(widths) > 1 or len(heads) > 1 or int(m.text_mlp_dim) != int(m.fusion_mlp_dim):
        raise MedjaxInputError(
            f"{_WHERE}: model.vision_width/text_width/hidden_size={sorted(widths)}, the three heads={sorted(heads)}, "
            f"text_mlp_dim={m.text_mlp_dim} / fusion_mlp_dim={m.fusion_mlp_dim}: the PyTorch restatement "
            "(medjax.convert.torch_ptunifier) needs one width, one head count and one text/fusion MLP width")
    return Dims(width=widths.pop(), heads=heads.pop(), mlp=int(m.text_mlp_dim), vocab=vocab, pool=int(m.pool_size),
                visual_prompts=int(m.num_visual_prompts), textual_prompts=int(m.num_textual_prompts),
                patch=int(m.patch_size), image=int(m.image_size), clip_layers=int(m.vision_depth) + 1,
                text_layers=int(m.text_depth), fusion=int(m.fusion_layers), text_positions=int(m.max_positions),
                clip_mlp=int(m.vision_mlp_dim), attn_implementation="sdpa")


def ptunifier_row(config, batch_size: int, sides: tuple[str, ...]) -> RowSides:
    """PTUnifier (Chen et al., ICCV 2023) on the image + text path: MLM cross-entropy on every text position and
    ITM cross-entropy on the joint features (random targets), against the PyTorch restatement of the released
    `PTUnifierTransformerSS` (`medjax.convert.torch_ptunifier`, HF RoBERTa / BERT layers with SDPA attention),
    the weights through `medjax.convert.ptunifier` (a Lightning checkpoint file). Dropout on in both steps
    (model.dropout: HF's 0.1 on the torch side). Outputs compared: the MLM logits (eval mode)."""
    import jax
    import jax.numpy as jnp
    import optax

    from medjax.convert import ptunifier as convert_ptunifier
    from medjax.convert.torch_ptunifier import TorchPTUnifier

    torch = _torch()
    m = config.model
    vocab = int(m.vocab_size) or 50265  # 0 in the small variants: the tokenizer's; RoBERTa's 50265 here
    dims = _ptunifier_dims(m, vocab)
    length = int(config.data.max_length)
    torch.manual_seed(int(config.seed))
    net = TorchPTUnifier(dims)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, dims.image, dims.image), dtype=np.float32)
    ids = rng.integers(5, vocab, size=(batch_size, length))
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    mask = np.ones_like(ids)
    mlm_targets = rng.integers(0, vocab, size=(batch_size, length))
    itm_targets = rng.integers(0, 2, size=(batch_size,))
    built = {}
    if "medjax" in sides:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "ptunifier.ckpt")
            torch.save({"state_dict": net.state_dict()}, path)
            model, variables, _ = convert_ptunifier.load_with_report(
                path, vision_heads=dims.heads, text_heads=dims.heads, fusion_heads=dims.heads,
                num_visual_prompts=dims.visual_prompts, num_textual_prompts=dims.textual_prompts,
                dropout=float(m.dropout), scan=m.get("scan", False))
        batch = {"images": jnp.asarray(images.transpose(0, 2, 3, 1)), "ids": jnp.asarray(ids, jnp.int32),
                 "mask": jnp.asarray(mask, jnp.int32), "mlm": jnp.asarray(mlm_targets, jnp.int32),
                 "itm": jnp.asarray(itm_targets, jnp.int32)}

        def heads(module, images, ids, mask, train):
            out = module.infer(images, ids, mask, train=train)
            return module.mlm_logits(out["text_feats"]), module.itm_logits(out["cls_feats"])

        def loss_fn(params, batch):
            mlm, itm = model.apply({"params": params}, batch["images"], batch["ids"], batch["mask"], True,
                                   method=heads, rngs={"dropout": jax.random.key(0)})
            return (optax.softmax_cross_entropy_with_integer_labels(mlm, batch["mlm"]).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(itm, batch["itm"]).mean())

        def forward_fn(params, batch):
            return model.apply({"params": params}, batch["images"], batch["ids"], batch["mask"], False, method=heads)[0]

        built["medjax"] = jax_side(loss_fn, forward_fn, variables["params"], batch)
    if "torch" in sides:
        x, t, a = torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask)
        y_mlm, y_itm = torch.from_numpy(mlm_targets), torch.from_numpy(itm_targets)

        def loss_torch(module):
            text, _, cls = module.infer(x, t, a)
            cross_entropy = torch.nn.functional.cross_entropy
            return (cross_entropy(module.mlm_head(text).reshape(-1, vocab), y_mlm.reshape(-1))
                    + cross_entropy(module.itm_head.fc(cls), y_itm))

        built["torch"] = torch_side(net, loss_torch, lambda module: module.mlm_head(module.infer(x, t, a)[0]).numpy())
    shapes = (f"batch {batch_size} x ({dims.image}^2 image /{dims.patch}, {length} tokens), width {dims.width}, "
              f"CLIP {dims.clip_layers - 1} + RoBERTa {dims.text_layers} + {dims.fusion} co-attention layers, "
              f"vocab {vocab}; MLM + ITM")
    return RowSides(built, shapes, "same random weights (PyTorch restatement -> medjax.convert.ptunifier)")


# ---------------------------------------------------------------------------------------- MRM's MAE

def mae_masking(model, key, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masking `medjax.models.mrm_mae.MAE` draws when applied with rngs={"masking": key}: (ids_keep (B, keep),
    ids_restore (B, N), mask (B, N) 1 = masked), for the PyTorch side. MAE.__call__'s make_rng("masking") is the
    module's first draw of that stream, so the same draw made here gives the same key."""
    from medjax.models.mrm_mae import random_keep

    n = (model.image_size // model.patch_size) ** 2
    drawn = model.apply({}, rngs={"masking": key}, method=lambda module: module.make_rng("masking"))
    ids_keep, ids_restore = (np.array(a) for a in random_keep(drawn, batch_size, n, int(n * (1 - model.mask_ratio))))
    mask = np.ones((batch_size, n), np.float32)
    np.put_along_axis(mask, ids_keep, 0.0, axis=1)
    return ids_keep, ids_restore, mask


def mae_row(config, batch_size: int, sides: tuple[str, ...]) -> RowSides:
    """MRM's image model as its authors ship it (CityU-AIM-Group/MRM `models_mrm.py` is plain MAE, He et al.
    CVPR 2022): `medjax.models.mrm_mae.MAE` (the `mrm_mae_baseline` model, with `mrm_retina`'s ViT-B/16
    encoder and 512 x 8 decoder) against timm `vit_base_patch16_224` + MAE's decoder
    (`medjax.convert.torch_mae`), the weights through `medjax.convert.mrm_mae`; both fed the same masking
    (medjax's draw, 75% of the patches unless model.mask_ratio says otherwise), loss MAE's per-patch
    normalised MSE on the masked patches; the fixed sin-cos position tables are not trained on either side.
    (MRM's genome branch and relation masking have no PyTorch original: not in this row.) Outputs
    compared: the predicted patches."""
    import jax
    import jax.numpy as jnp

    from medjax.convert import mrm_mae as convert_mae
    from medjax.convert import torch_mae
    from medjax.losses.reconstruction import masked_image_mse
    from medjax.models.mrm_mae import MAE

    torch = _torch()
    m = config.model
    fields = dict(image_size=int(m.image_size), patch_size=int(m.patch_size), width=int(m.width), depth=int(m.depth),
                  num_heads=int(m.num_heads), mlp_ratio=float(m.mlp_ratio), decoder_width=int(m.decoder_width),
                  decoder_depth=int(m.decoder_depth), decoder_heads=int(m.decoder_heads))
    norm_pix = bool(m.norm_pix_loss)
    ratio = float(m.get("mask_ratio", 0.75))
    model = MAE(**fields, mask_ratio=ratio, remat=m.get("remat", "none"), scan=m.get("scan", None))
    torch.manual_seed(int(config.seed))
    net = torch_mae.mae_torch(**fields, norm_pix_loss=norm_pix)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, fields["image_size"], fields["image_size"], 3), dtype=np.float32)
    masking = jax.random.key(1)
    ids_keep, ids_restore, patch_mask = mae_masking(model, masking, batch_size)
    built = {}
    if "medjax" in sides:
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        params = convert_mae.convert_state_dict(state, model, "random PyTorch weights")
        tables = {"pos_embed": params["image_encoder"].pop("pos_embed")}  # fixed: not trained (MAE, the mrm tasks)
        batch = {"images": jnp.asarray(images)}

        def apply(params, batch, train):
            full = dict(params, image_encoder=dict(params["image_encoder"], **tables))
            return model.apply({"params": full}, batch["images"], train=train, rngs={"masking": masking})

        def loss_fn(params, batch):
            out = apply(params, batch, True)
            return masked_image_mse(out["pred"], batch["images"], fields["patch_size"], norm_pix_loss=norm_pix,
                                    patch_mask=out["mask"])

        built["medjax"] = jax_side(loss_fn, lambda p, b: apply(p, b, False)["pred"], params, batch)
    if "torch" in sides:
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        keep, restore = torch.from_numpy(ids_keep).long(), torch.from_numpy(ids_restore).long()
        mask = torch.from_numpy(patch_mask)
        built["torch"] = torch_side(net, lambda module: module.loss(x, module(x, keep, restore), mask),
                                    lambda module: module(x, keep, restore).numpy())
    shapes = (f"batch {batch_size} x {fields['image_size']}^2, ViT {fields['width']}x{fields['depth']} "
              f"/{fields['patch_size']} + decoder {fields['decoder_width']}x{fields['decoder_depth']}, "
              f"mask ratio {ratio}")
    return RowSides(built, shapes, "same random weights (timm + MAE decoder -> medjax.convert.mrm_mae), same masking")


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


__all__ = ["ADAMW", "ROWS", "RowSides", "build_row", "mae_masking"]
