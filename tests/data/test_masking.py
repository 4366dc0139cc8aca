"""DINOv2 / BEiT block masking: counts, block shapes, collate rule, buffer bound, determinism."""
import numpy as np
import pytest
from scipy import ndimage

from medjax.data.transforms.block_masking import MaskingGenerator, max_masked_patches, sample_masks


def test_generator_masks_blocks_up_to_the_request():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    assert not gen(np.random.default_rng(0), 0).any()
    counts = []
    for seed in range(200):
        want = int(np.random.default_rng(seed + 1000).integers(4, 99))
        mask = gen(np.random.default_rng(seed), want)
        assert mask.shape == (14, 14) and mask.dtype == bool
        assert 0 < mask.sum() <= want
        counts.append(mask.sum() / want)
        # A single block: a filled rectangle of >= 3 patches (target area >= 4, rounded) narrower than the grid.
        one = gen(np.random.default_rng(seed), 0)
        gen._add_block(np.random.default_rng(seed), one, 20)
        rows, cols = np.nonzero(one)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert one.sum() == h * w >= 3 and h < 14 and w < 14
    assert np.mean(counts) > 0.9  # the request is (nearly always) met on a 14 x 14 grid
    np.testing.assert_array_equal(gen(np.random.default_rng(5), 40), gen(np.random.default_rng(5), 40))


def test_block_aspect_ratio_range():
    gen = MaskingGenerator(14, min_num_patches=16, max_num_patches=16)
    ratios = []
    for seed in range(300):
        mask = np.zeros((14, 14), bool)
        if gen._add_block(np.random.default_rng(seed), mask, 16):
            rows, cols = np.nonzero(mask)
            ratios.append((np.ptp(rows) + 1) / (np.ptp(cols) + 1))
    # area 16 with h/w log-uniform in [0.3, 1/0.3] -> shapes 2x7 .. 7x2 (rounding), both orientations
    assert min(ratios) < 0.5 and max(ratios) > 2.0 and 0.25 <= min(ratios) and max(ratios) <= 4.0


def test_sample_masks_collate_rule_and_bound():
    gen = MaskingGenerator(14, max_num_patches=98)
    n = 196
    per_pair = []
    for seed in range(100):
        masks = sample_masks(np.random.default_rng(seed), gen, 2)
        assert masks.shape == (2, n)
        counts = masks.sum(1)
        assert (counts > 0).sum() == 1  # one of the two global crops is masked
        per_pair.append(counts.max())
        assert counts.max() <= max_masked_patches(n, 2) == 98
    per_pair = np.array(per_pair)
    assert per_pair.min() >= int(0.1 * n) - 4 and per_pair.max() <= 98
    assert 0.2 * n < per_pair.mean() < 0.4 * n  # ratio uniform in [0.1, 0.5]: mean 0.3
    # A GPU batch (DINOv2 collate over 2 x 64 crops): 64 masked, ratio bins increase.
    masks = sample_masks(np.random.default_rng(0), gen, 128)
    assert (masks.sum(1) > 0).sum() == 64
    assert masks.sum() <= max_masked_patches(n, 128)
    bins = np.linspace(0.1, 0.5, 65)
    assert max_masked_patches(n, 128) == sum(int(n * hi) for hi in bins[1:])
    np.testing.assert_array_equal(sample_masks(np.random.default_rng(3), gen, 8), sample_masks(np.random.default_rng(3), gen, 8))
    with pytest.raises(ValueError, match="ratio_range"):
        sample_masks(np.random.default_rng(0), gen, 2, ratio_range=(0.6, 0.5))


def test_masks_are_unions_of_blocks_not_scattered_patches():
    gen = MaskingGenerator(14, max_num_patches=98)
    mask = gen(np.random.default_rng(7), 60)
    labels, count = ndimage.label(mask)
    assert count <= 60 // 3  # every block has >= 3 patches
    assert all((labels == i).sum() >= 3 for i in range(1, count + 1))
