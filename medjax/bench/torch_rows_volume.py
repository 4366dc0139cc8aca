"""The Universal Model's `python -m medjax.bench vs-torch` rows (universal_swin, universal_unet; Liu et al.,
ICCV 2023): MONAI's SwinUNETR / the Models-Genesis UNet3D with the original's head, against medjax's
conversion of the same weights (`medjax.bench.torch_rows` lists every row)."""
from __future__ import annotations

import numpy as np

from medjax.bench.row_sides import RowSides, torch_with_threads
from medjax.bench.step_pair import jax_side, torch_side
from medjax.errors import MedjaxInputError

_WHERE = "medjax/bench/torch_rows_volume.py"


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

    torch = torch_with_threads()
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
