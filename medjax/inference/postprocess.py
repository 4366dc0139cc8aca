"""Post-processing of the CLIP-Driven Universal Model's 32 thresholded sigmoid outputs (Liu et al., ICCV
2023, arXiv 2301.00785, Sec. 3.4 / the original's `utils/utils.py` `organ_post_process`, `merge_label`; its
`threshold_organ`, sigmoid > 0.5, is `UniversalPredictor.masks`'), in numpy/scipy on the host.

Masks are bool (X, Y, Z, 32) in RAS (x grows towards the patient's right); channel c - 1 is class c
(`medjax.ontology.universal_classes`). For the classes of `classes` (the original's `organ_list`: a dataset's
template in evaluation, all 32 in prediction), in the original's order of rules:
- organs 1-9, 12-14, 18-25 and the pancreas (11): the largest 26-connected component;
- the portal/splenic vein (10), when the pancreas is also listed: voxels below the pancreas's lowest
  axial slice (z < min z of the post-processed pancreas) removed; otherwise kept as predicted;
- the lungs, when the right lung (16) is listed: the union of both lung channels split into its two
  largest 26-connected components, the one with the smaller mean x is the left lung (17), the other
  the right lung (16); with fewer than two components both lungs are emptied (the original's
  "this case does not have lungs"). Listing only the left lung (17) leaves both lungs empty, as in
  the original;
- kidney tumour (26) and liver tumour (27): kept only inside their organ region: the union of the
  organ channels (kidneys 2, 3 / liver 6, as predicted, before their own post-processing) reduced to
  its largest 2 / 1 components, then closed and dilated with a 5x5x5 cube (scipy defaults: outside
  the volume counts as background);
- everything else listed (15, 28-32, and 10 without 11): as predicted. Unlisted classes: empty.

Deviations, stated: where the original would crash (a listed vein with an empty pancreas:
`np.min` of nothing), the vein is kept as predicted. Ties between equally large components keep the
one scipy labels first (raster order); the original's cc3d order may differ on exact ties.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from medjax.data.transforms.ct_preprocess import foreground_box
from medjax.ontology import universal_classes as templates

NUM_CLASSES = templates.NUM_CLASSES
LARGEST_COMPONENT_CLASSES = frozenset((1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 18, 19, 20, 21, 22, 23, 24, 25))
PANCREAS, PORTAL_SPLENIC_VEIN, RIGHT_LUNG, LEFT_LUNG = 11, 10, 16, 17
# Tumours filtered by their organ region: tumour class -> organ classes (original TUMOR_ORGAN for 26, 27).
TUMOUR_REGION_ORGANS = {26: (2, 3), 27: (6,)}
ORGAN_REGION_CUBE = 5  # closing + dilation structure edge (voxels), original `organ_region_filter_out`
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def largest_components(mask: np.ndarray, k: int = 1, *, min_size: int = 0) -> np.ndarray:
    """The k largest 26-connected components of a 3D bool mask with more than `min_size` voxels
    (original `extract_topk_largest_candidates`)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"largest_components needs a 3D mask, got shape {mask.shape}")
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    box = foreground_box(mask)
    labels, count = ndimage.label(mask[box], structure=_CONNECTIVITY_26)  # same raster order as uncropped
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:k]  # ties: the lower label (first in raster order)
    keep = np.zeros(count + 1, dtype=bool)
    keep[order[sizes[order] > min_size] + 1] = True
    out[box] = keep[labels]
    return out


def split_lungs(right: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right lung, left lung) from the union of the two lung masks: its two largest components,
    the one lower in mean x (towards the patient's left in RAS) is the left lung. Fewer than two
    components: both empty (original `lung_post_process` + its IndexError branch)."""
    union = np.asarray(right, dtype=bool) | np.asarray(left, dtype=bool)
    labels, count = ndimage.label(union, structure=_CONNECTIVITY_26)
    empty = np.zeros(union.shape, dtype=bool)
    if count < 2:
        return empty, empty.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    one, two = np.argsort(-sizes, kind="stable")[:2] + 1
    (x_one, *_), (x_two, *_) = ndimage.center_of_mass(union, labels, [one, two])
    left_label, right_label = (one, two) if x_one < x_two else (two, one)
    return labels == right_label, labels == left_label


def organ_region(organ_masks: Iterable[np.ndarray], *, cube: int = ORGAN_REGION_CUBE) -> np.ndarray:
    """The region a tumour must lie in: union of the organ masks, its largest len(masks) components,
    closed then dilated with a cube (original `merge_and_top_organ` + `organ_region_filter_out`)."""
    masks = [np.asarray(m, dtype=bool) for m in organ_masks]
    region = largest_components(np.logical_or.reduce(masks), len(masks))
    out = np.zeros(region.shape, dtype=bool)
    if not region.any():
        return out
    # Work in the region's bounding box grown by two cube edges (closing + dilation reach less), clipped
    # to the volume: the same result as on the whole volume, whose outside also counts as background.
    margin = 2 * cube
    box = tuple(slice(max(b.start - margin, 0), b.stop + margin) for b in foreground_box(region))
    structure = np.ones((cube,) * 3, dtype=bool)
    closed = ndimage.binary_closing(region[box], structure=structure)
    out[box] = ndimage.binary_dilation(closed, structure=structure)
    return out


def trim_vein_below_pancreas(vein: np.ndarray, pancreas: np.ndarray) -> np.ndarray:
    """The vein with every axial slice below the pancreas's lowest one removed (original
    `PSVein_post_process`); an empty pancreas leaves the vein unchanged."""
    slices = np.flatnonzero(np.asarray(pancreas, dtype=bool).any(axis=(0, 1)))
    vein = np.array(vein, dtype=bool)
    if slices.size:
        vein[:, :, :slices[0]] = False
    return vein


def organ_post_process(masks: np.ndarray, classes: Iterable[int] = range(1, NUM_CLASSES + 1)) -> np.ndarray:
    """bool (X, Y, Z, 32) post-processed masks for the listed 1-based `classes` (module docstring)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4 or masks.shape[-1] != NUM_CLASSES:
        raise ValueError(f"masks must be (X, Y, Z, {NUM_CLASSES}), got shape {masks.shape}")
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 1 <= c <= NUM_CLASSES]
    if bad:
        raise ValueError(f"classes must be 1-based ids in [1, {NUM_CLASSES}], got {bad}")
    out = np.zeros_like(masks)
    channel = lambda c: masks[..., c - 1]  # noqa: E731  (the raw prediction of class c)
    for c in classes:
        if c == PANCREAS:
            out[..., c - 1] = largest_components(channel(c))
            if PORTAL_SPLENIC_VEIN in classes:
                out[..., PORTAL_SPLENIC_VEIN - 1] = trim_vein_below_pancreas(channel(PORTAL_SPLENIC_VEIN),
                                                                             out[..., c - 1])
        elif c == RIGHT_LUNG:
            out[..., RIGHT_LUNG - 1], out[..., LEFT_LUNG - 1] = split_lungs(channel(RIGHT_LUNG), channel(LEFT_LUNG))
        elif c == LEFT_LUNG:
            continue  # handled with the right lung
        elif c == PORTAL_SPLENIC_VEIN and PANCREAS in classes:
            continue  # handled with the pancreas, whatever the order
        elif c in LARGEST_COMPONENT_CLASSES:
            out[..., c - 1] = largest_components(channel(c))
        elif c in TUMOUR_REGION_ORGANS:
            region = organ_region([channel(o) for o in TUMOUR_REGION_ORGANS[c]])
            out[..., c - 1] = channel(c) & region
        else:
            out[..., c - 1] = channel(c)
    return out


def merge_labels(masks: np.ndarray) -> np.ndarray:
    """uint8 (X, Y, Z) class-id map of (X, Y, Z, 32) masks, 0 where none is set; where several are,
    the highest class id wins, so tumours (26-32) overwrite their organs (the original's
    `merge_label`, which writes the classes in ascending order)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4 or masks.shape[-1] != NUM_CLASSES:
        raise ValueError(f"masks must be (X, Y, Z, {NUM_CLASSES}), got shape {masks.shape}")
    label = np.zeros(masks.shape[:3], dtype=np.uint8)
    for c in range(1, NUM_CLASSES + 1):  # ascending: a later (higher) class overwrites
        np.putmask(label, masks[..., c - 1], c)
    return label
