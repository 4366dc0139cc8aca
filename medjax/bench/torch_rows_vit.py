"""The ViT rows of `python -m medjax.bench vs-torch`: uni_vitl16 (timm ViT-L/16 + DINOv2's DINOHead; Chen et
al., Nat. Med. 2024) and mrm_retina / mrm_mae_baseline (the authors' MAE, timm ViT-B/16 + the 512 x 8
decoder; Yang et al., ICCV 2023) (`medjax.bench.torch_rows` lists every row)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from medjax.bench.row_sides import RowSides, torch_with_threads
from medjax.bench.step_pair import jax_side, torch_side


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

    torch = torch_with_threads()
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

    torch = torch_with_threads()
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
