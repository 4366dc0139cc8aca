"""Universal Model post-processing on small synthetic masks with known answers."""
import numpy as np
import pytest

from medjax.inference.postprocess import largest_components, merge_labels, organ_post_process, split_lungs

SHAPE = (24, 16, 16)


def empty_masks():
    return np.zeros(SHAPE + (32,), dtype=bool)


def box(x0, x1, y0, y1, z0, z1):
    m = np.zeros(SHAPE, dtype=bool)
    m[x0:x1, y0:y1, z0:z1] = True
    return m


def test_largest_components_uses_26_connectivity():
    m = box(2, 5, 2, 5, 2, 5)  # 27 voxels
    m[10, 10, 10] = m[11, 11, 11] = True  # corner-touching pair: one component of 2
    m[20, 2, 2] = True
    np.testing.assert_array_equal(largest_components(m), box(2, 5, 2, 5, 2, 5))
    two = largest_components(m, 2)
    assert two.sum() == 29 and two[11, 11, 11] and not two[20, 2, 2]
    assert largest_components(m, 3, min_size=1).sum() == 29  # the single voxel is not > 1
    assert not largest_components(np.zeros(SHAPE, bool)).any()


def test_organs_keep_their_largest_component_and_unlisted_classes_are_empty():
    masks = empty_masks()
    spleen = box(2, 6, 2, 6, 2, 6)
    masks[..., 0] = spleen
    masks[20, 14, 14, 0] = True  # a stray voxel
    masks[..., 7] = box(10, 12, 2, 4, 2, 4)  # aorta (class 8), not listed below
    masks[..., 14] = box(10, 12, 8, 10, 2, 4) | box(15, 17, 8, 10, 2, 4)  # hepatic vessel: kept as predicted
    out = organ_post_process(masks, classes=[1, 15])
    np.testing.assert_array_equal(out[..., 0], spleen)
    assert not out[..., 7].any()
    np.testing.assert_array_equal(out[..., 14], masks[..., 14])
    assert out.sum() == spleen.sum() + masks[..., 14].sum()


def test_lungs_split_left_right_by_mean_x():
    masks = empty_masks()
    low_x, high_x = box(1, 8, 2, 12, 2, 12), box(14, 22, 2, 12, 2, 12)
    # the network mixed the sides up: each channel holds parts of both lungs
    masks[..., 15] = low_x & (np.arange(SHAPE[2]) < 7) | high_x & (np.arange(SHAPE[1])[:, None] < 5)
    masks[..., 16] = (low_x | high_x) & ~masks[..., 15]
    masks[23, 15, 15, 16] = True  # a third, small component: dropped
    out = organ_post_process(masks, classes=[16, 17])
    np.testing.assert_array_equal(out[..., 16], low_x)  # left lung (17): lower x, towards the patient's left
    np.testing.assert_array_equal(out[..., 15], high_x)  # right lung (16)
    right, left = split_lungs(low_x | high_x, np.zeros(SHAPE, bool))
    np.testing.assert_array_equal(left, low_x)
    np.testing.assert_array_equal(right, high_x)


def test_one_lung_component_empties_both_lungs_as_the_original():
    masks = empty_masks()
    masks[..., 15] = box(2, 20, 2, 12, 2, 12)
    out = organ_post_process(masks, classes=[16, 17])
    assert not out[..., 15].any() and not out[..., 16].any()
    only_left_listed = organ_post_process(masks, classes=[17])
    assert not only_left_listed.any()


def test_liver_tumour_kept_only_inside_the_dilated_liver():
    masks = empty_masks()
    liver = box(4, 14, 4, 12, 4, 12)
    masks[..., 5] = liver
    masks[0, 0, 0, 5] = True  # stray liver voxel: not part of the region
    inside = box(6, 8, 6, 8, 6, 8)
    near = box(15, 16, 6, 8, 6, 8)  # 2 voxels past the liver's edge (x = 13): within the 5^3 dilation
    far = box(19, 21, 6, 8, 6, 8)  # 6 voxels past: outside
    masks[..., 26] = inside | near | far
    masks[1, 1, 1, 26] = True  # next to the stray liver voxel, which the region excludes
    out = organ_post_process(masks, classes=[6, 27])
    np.testing.assert_array_equal(out[..., 26], inside | near)
    np.testing.assert_array_equal(out[..., 5], liver)


def test_kidney_tumour_region_is_both_kidneys():
    masks = empty_masks()
    right_kidney, left_kidney = box(2, 6, 4, 10, 4, 10), box(16, 20, 4, 10, 4, 10)
    masks[..., 1], masks[..., 2] = right_kidney, left_kidney
    in_left, between = box(17, 19, 6, 8, 6, 8), box(11, 12, 6, 8, 6, 8)
    masks[..., 25] = in_left | between
    out = organ_post_process(masks, classes=[2, 3, 26])
    np.testing.assert_array_equal(out[..., 25], in_left)


def test_vein_trimmed_below_the_pancreas():
    masks = empty_masks()
    masks[..., 10] = box(8, 12, 6, 10, 5, 9)  # pancreas spans z 5..8
    masks[2, 2, 2, 10] = True  # stray pancreas voxel, removed before the vein is trimmed
    masks[..., 9] = box(3, 5, 3, 5, 0, 16)
    out = organ_post_process(masks)
    expected = box(3, 5, 3, 5, 5, 16)
    np.testing.assert_array_equal(out[..., 9], expected)
    np.testing.assert_array_equal(organ_post_process(masks, classes=[10])[..., 9], masks[..., 9])


def test_merge_labels_highest_class_wins():
    masks = empty_masks()
    masks[..., 5] = box(2, 10, 2, 10, 2, 10)  # liver, class 6
    masks[..., 26] = box(4, 6, 4, 6, 4, 6)  # liver tumour, class 27, inside it
    masks[20, 3, 3, 0] = True  # spleen, class 1
    label = merge_labels(masks)
    assert label.dtype == np.uint8 and label.shape == SHAPE
    assert label[3, 3, 3] == 6 and label[5, 5, 5] == 27 and label[20, 3, 3] == 1 and label[0, 0, 0] == 0
    assert np.count_nonzero(label) == 8 * 8 * 8 + 1
    with pytest.raises(ValueError, match="32"):
        merge_labels(np.zeros((4, 4, 4, 3), bool))
