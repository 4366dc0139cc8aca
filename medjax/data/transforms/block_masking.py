"""iBOT / DINOv2 block masking of patch grids (BEiT's blockwise masking, Bao et al., ICLR 2022, Alg. 1;
DINOv2 `dinov2/data/masking.py` and `collate_data_and_cast`), numpy, every random choice from the
`np.random.Generator` passed in.

    generator = MaskingGenerator((14, 14), max_num_patches=98)      # DINOv2: 0.5 * 14 * 14
    masks = sample_masks(rng, generator, num_images=2)               # (2, 196) bool

`MaskingGenerator(rng, n)` masks about n patches with rectangles of >= `min_num_patches` (4) patches
and aspect ratio log-uniform in (0.3, 1 / 0.3), each rectangle adding at most the patches still
missing; it stops early when 10 tries in a row add nothing.

`sample_masks` is DINOv2's collate rule for a group of images: int(num_images * probability) of them
(probability 0.5) are masked, the i-th with ratio uniform in the i-th of equal bins over
`ratio_range` (0.1, 0.5), the rest not at all, in a random order. DINOv2 applies it to a GPU's batch
of global crops; medjax applies it to the two global crops of each sample (one is masked, at a ratio
uniform in [0.1, 0.5]), so a sample's masks depend only on its own seed -- the same on any number of
processes -- and a batch has at most `max_masked_patches` masked patches, the static buffer size the
iBOT loss needs under `jax.jit`.
"""
from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """BEiT/DINOv2 block masking on a (height, width) patch grid (module doc)."""

    def __init__(self, grid: int | tuple[int, int], *, min_num_patches: int = 4, max_num_patches: float | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if self.height < 1 or self.width < 1 or min_num_patches < 1 or min_aspect <= 0:
            raise ValueError(f"medjax/data/transforms/block_masking.py MaskingGenerator: need a positive grid, min_num_patches >= 1 and "
                             f"min_aspect > 0, got grid {(self.height, self.width)}, {min_num_patches}, {min_aspect}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, rng: np.random.Generator, mask: np.ndarray, max_mask_patches: float) -> int:
        """One rectangle adding between 1 and `max_mask_patches` new patches (10 tries); the number added."""
        for _ in range(10):
            # Python's random.uniform(a, b) = a + (b - a) * U, also when b < a (few patches left)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator, num_masking_patches: int) -> np.ndarray:
        """(height, width) bool with at most `num_masking_patches` patches masked."""
        mask = np.zeros((self.height, self.width), bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(rng, mask, min(num_masking_patches - count, self.max_num_patches))
            if delta == 0:
                break
            count += delta
        return mask


def _ratio_bins(num_images: int, ratio_range: tuple[float, float], probability: float) -> np.ndarray:
    return np.linspace(ratio_range[0], ratio_range[1], int(num_images * probability) + 1)


def sample_masks(rng: np.random.Generator, generator: MaskingGenerator, num_images: int, *,
                 ratio_range: tuple[float, float] = (0.1, 0.5), probability: float = 0.5) -> np.ndarray:
    """(num_images, patches) bool masks with DINOv2's collate rule (module doc)."""
    if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0 or not 0.0 <= probability <= 1.0:
        raise ValueError(f"medjax/data/transforms/block_masking.py sample_masks: need 0 <= ratio_range[0] <= ratio_range[1] <= 1 and "
                         f"0 <= probability <= 1, got {ratio_range}, {probability}")
    n = generator.num_patches
    bins = _ratio_bins(num_images, ratio_range, probability)
    masks = [generator(rng, int(n * rng.uniform(lo, hi))) for lo, hi in zip(bins[:-1], bins[1:])]
    masks += [np.zeros((generator.height, generator.width), bool)] * (num_images - len(masks))
    order = rng.permutation(num_images)
    return np.stack([masks[i] for i in order]).reshape(num_images, n)


def max_masked_patches(num_patches: int, num_images: int, *, ratio_range: tuple[float, float] = (0.1, 0.5),
                       probability: float = 0.5) -> int:
    """The most patches `sample_masks` can mask in a group (DINOv2's `upperbound`): sum_i int(N * bin_i's top)."""
    bins = _ratio_bins(num_images, ratio_range, probability)
    return int(sum(int(num_patches * hi) for hi in bins[1:]))
