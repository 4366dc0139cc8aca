"""Partial-label segmentation loss of the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv
2301.00785, Sec. 3.3; the original's `utils/loss.py` `Multi_BCELoss` + `DiceLoss`, summed 1:1 in
`train.py`).

Each training sample comes from a dataset that annotates only some of the 32 classes
(`medjax.ontology.universal_classes.TEMPLATES`; the pipeline's `label_mask`). For every labelled
(sample, class) pair n, with p = sigmoid(logit), t in {0, 1} over the V voxels of the crop:

    BCE_n  = (1/V) sum_v [ -t log p - (1 - t) log(1 - p) ]          (BCEWithLogitsLoss, mean)
    Dice_n = 1 - 2 sum_v p t / (sum_v p + sum_v t + smooth)          (smooth = 1, denominator only)
    L      = mean_n BCE_n + mean_n Dice_n                            (means over the labelled pairs)

Unlabelled pairs enter neither sum nor count, so their logits get exactly zero gradient. A batch
without a labelled pair gives L = 0.

Logged beside L (issue #23): `dice_loss_present`, the mean Dice_n over the labelled pairs whose class has a
voxel in the crop, the only Dice terms that can move. `dice_loss` (the original's average, which L uses) also
counts the labelled classes absent from the crop, each a constant 1 (below); on a 14-organ dataset most of
its terms are such constants, so it reads ~1 however well the present organs are segmented.

Dice, stated: the original's `BinaryDiceLoss` smooths only the denominator (kept here: an empty
ground truth then gives a constant loss 1 with no gradient, so a crop without the organ is trained by
BCE alone). Its first release computed Dice per first-axis slice of the volume and averaged the
slices; its latest release flattens the volume and then sums over a dimension that no longer exists
(a crash). medjax computes the standard soft Dice per (sample, class) over the whole crop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_WHERE = "medjax/losses/segmentation.py"


def _check(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> None:
    if logits.shape != labels.shape or logits.ndim < 3:
        raise ValueError(f"{_WHERE}: logits {logits.shape} and labels {labels.shape} must both be "
                         "(batch, *spatial, classes)")
    if label_mask.shape != (logits.shape[0], logits.shape[-1]):
        raise ValueError(f"{_WHERE}: label_mask must be (batch={logits.shape[0]}, classes={logits.shape[-1]}), "
                         f"got {label_mask.shape}")


def per_class_bce_dice(logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(BCE, Dice loss), each (batch, classes): voxel-mean BCE-with-logits and 1 - soft Dice per
    (sample, class), over the spatial axes of (batch, *spatial, classes) inputs (fp32)."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    spatial = tuple(range(1, logits.ndim - 1))
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=spatial)
    probs = jax.nn.sigmoid(logits)
    overlap = jnp.sum(probs * labels, axis=spatial)
    denominator = jnp.sum(probs, axis=spatial) + jnp.sum(labels, axis=spatial) + smooth
    return bce, 1.0 - 2.0 * overlap / denominator


def partial_label_bce_dice(logits: jax.Array, labels: jax.Array, label_mask: jax.Array, *,
                           smooth: float = 1.0, bce_weight: float = 1.0,
                           dice_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(L, {"bce", "dice_loss", "dice_loss_present", "labelled_pairs", "present_pairs"}) of the module docstring.

    logits, labels: (batch, X, Y, Z, classes); label_mask: bool (batch, classes), True where the
    sample's dataset annotates the class. L = bce_weight * mean BCE + dice_weight * mean Dice loss over
    the labelled pairs (1:1 in the paper).
    """
    _check(logits, labels, label_mask)
    bce, dice_loss = per_class_bce_dice(logits, labels, smooth=smooth)
    mask = label_mask.astype(bool)
    count = jnp.sum(mask).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)
    # where(): the unselected branch's cotangent is exactly zero (and both branches are finite).
    mean_bce = jnp.sum(jnp.where(mask, bce, 0.0)) / denom
    mean_dice = jnp.sum(jnp.where(mask, dice_loss, 0.0)) / denom
    loss = bce_weight * mean_bce + dice_weight * mean_dice
    spatial = tuple(range(1, labels.ndim - 1))
    present = mask & jnp.any(labels > 0, axis=spatial)  # labelled and in the crop: the learnable Dice terms
    present_count = jnp.sum(present).astype(jnp.float32)
    dice_present = jnp.sum(jnp.where(present, dice_loss, 0.0)) / jnp.maximum(present_count, 1.0)
    return loss, {"bce": mean_bce, "dice_loss": mean_dice, "dice_loss_present": jax.lax.stop_gradient(dice_present),
                  "labelled_pairs": count, "present_pairs": present_count}


DICE_REDUCTIONS = ("pooled", "per_class")


def pooled_bce_dice(logits: jax.Array, labels: jax.Array, *, bce_weight: float = 0.2, dice_weight: float = 0.8,
                    smooth: float = 1.0, dice: str = "pooled") -> tuple[jax.Array, dict[str, jax.Array]]:
    """ContIG's PALM loss (HealthML/ContIG `palm_myopia_segmentation.py`: `loss_fn`, `DiceLoss`), used by MRM's
    segmentation transfer: bce_weight * BCEWithLogits (mean over every element) + dice_weight * Dice loss, with
    (B, H, W, classes) inputs and the soft Dice 1 - (2 sum p t + smooth) / (sum p + sum t + smooth):
    - dice="pooled" (ContIG): one Dice pooled over the whole batch and every class (the original flattens the
      (batch, classes, H, W) tensors), so the class with the larger area dominates it;
    - dice="per_class" (our option): the Dice of each class channel pooled over the batch and pixels, averaged
      over the classes (every structure weighs the same, however small).
    Returns (loss, {"bce", "dice_loss"})."""
    if logits.shape != labels.shape:
        raise ValueError(f"{_WHERE} pooled_bce_dice: logits {logits.shape} and labels {labels.shape} differ")
    if dice not in DICE_REDUCTIONS:
        raise ValueError(f"{_WHERE} pooled_bce_dice: dice={dice!r}; expected one of {list(DICE_REDUCTIONS)} "
                         "(loss.dice)")
    logits, labels = logits.astype(jnp.float32), labels.astype(jnp.float32)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(logits.ndim - 1)) if dice == "per_class" else None  # per class: all but the last axis
    overlap, predicted, target = (jnp.sum(x, axis=axes) for x in (probs * labels, probs, labels))
    dice_loss = jnp.mean(1.0 - (2.0 * overlap + smooth) / (predicted + target + smooth))
    return bce_weight * bce + dice_weight * dice_loss, {"bce": bce, "dice_loss": dice_loss}
