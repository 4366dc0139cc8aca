"""ViSD-Boost's examples (Cao et al., ICCV 2025): fVLM's CT-RATE pipeline (medjax.tasks.fvlm_data: resample,
HU window, organ bounding-box crop, pad, random crop + flips), plus, for the vision semantic enhancement
stage, a second augmented view of the same scan: another random crop with its own flips (our choice of
augmentation; the paper names none). An organ takes part in that stage only where it is intact in both views.

Zero-shot evaluation windows (`organ_window`, `OrganWindowExample`; both released eval scripts): one window
per (scan, organ), centred on that organ's mask bounding box, padded where it reaches past the volume with
fvlm_data.PAD_VALUE (0.0 on the windowed volume = HU -1150, as the training crops and the original's zero
`SpatialPadd` after the HU window; the mask with background). The originals grow the window to max(window, organ extent)
and skip organs under 90% complete; under static shapes the window here is fixed (`eval.window_shape`) and an
organ counts where at least `eval.min_organ_fraction` (0.9) of its voxels lie in its window (our choice: an
organ larger than the window is scored on its central part if that is >= 90% of it, else skipped).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medjax.tasks.fvlm_data import PAD_VALUE, FVLMExample, crop_organs


class ViSDExample(FVLMExample):
    """FVLMExample's keys, plus with `two_views` "volumes_b", "masks_b", "intact_b" (the second view)."""

    def __init__(self, tokenizer, crop_shape: Sequence[int], max_length: int, train: bool = True, flip_p: float = 0.2,
                 two_views: bool = False):
        super().__init__(tokenizer, crop_shape, max_length, train, flip_p)
        self.two_views = bool(two_views)

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        example = super().__call__(item, rng)
        if self.two_views:
            volume, mask, intact = crop_organs(item["volume"], item["mask"], self.crop_shape, len(item["texts"]),
                                               rng if self.train else None, self.flip_p)
            example.update(volumes_b=volume[..., None].astype(np.float32), masks_b=mask.astype(np.int32),
                           intact_b=intact)
        return example


def organ_window(volume: np.ndarray, mask: np.ndarray, label: int, window_shape: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(volume, mask, fraction) of `window_shape` (D, H, W) centred on the bounding box of `mask == label`:
    window start = (box low + box high) // 2 - window // 2 per axis, voxels outside the volume PAD_VALUE
    (volume: HU -1150 after the window) and background (mask); fraction = the organ's voxels inside the window / all its voxels (0.0 when the
    organ is absent: no window to score)."""
    window = tuple(int(w) for w in window_shape)
    if volume.shape != mask.shape or volume.ndim != 3 or len(window) != 3:
        raise ValueError(f"organ_window: volume and mask (D, H, W) of one shape and a 3-d window expected, got "
                         f"{volume.shape}, {mask.shape} and {window}")
    where = np.argwhere(mask == label)
    if not len(where):
        return np.full(window, PAD_VALUE, volume.dtype), np.zeros(window, mask.dtype), 0.0
    centre = (where.min(0) + where.max(0) + 1) // 2
    start = centre - np.asarray(window) // 2
    src = tuple(slice(max(a, 0), min(a + w, s)) for a, w, s in zip(start, window, volume.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start))
    out_volume, out_mask = np.full(window, PAD_VALUE, volume.dtype), np.zeros(window, mask.dtype)
    out_volume[dst], out_mask[dst] = volume[src], mask[src]
    return out_volume, out_mask, float(np.count_nonzero(out_mask == label) / len(where))


class OrganWindowExample:
    """Picklable dataset item -> {"volumes" (organs, D, H, W, 1), "masks" (organs, D, H, W) int32, "intact"
    (organs,) bool}: window k centred on organ k (mask label k + 1), intact where >= min_fraction of the
    organ lies in it (module docstring)."""

    def __init__(self, window_shape: Sequence[int], num_organs: int, min_fraction: float = 0.9):
        self.window_shape, self.num_organs = tuple(int(w) for w in window_shape), int(num_organs)
        self.min_fraction = float(min_fraction)

    def __call__(self, item: dict) -> dict:
        windows = [organ_window(item["volume"], item["mask"], k + 1, self.window_shape) for k in range(self.num_organs)]
        return {"volumes": np.stack([v for v, _, _ in windows])[..., None].astype(np.float32),
                "masks": np.stack([m for _, m, _ in windows]).astype(np.int32),
                "intact": np.asarray([f > 0 and f >= self.min_fraction for _, _, f in windows])}
