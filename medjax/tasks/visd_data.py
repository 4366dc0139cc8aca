"""ViSD-Boost's examples (Cao et al., ICCV 2025): fVLM's CT-RATE pipeline (medjax.tasks.fvlm_data: resample,
HU window, organ bounding-box crop, pad, random crop + flips), plus, for the vision semantic enhancement
stage, a second augmented view of the same scan: another random crop with its own flips (our choice of
augmentation; the paper names none). An organ takes part in that stage only where it is intact in both views.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medjax.tasks.fvlm_data import FVLMExample, crop_organs


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
