"""ViSD-Boost's zero-shot evaluation windows (medjax.tasks.visd_data.organ_window): centred on the organ's
mask bounding box, zero-padded where they reach past the volume, the organ's in-window fraction; values
against hand-built windows."""
import numpy as np
import pytest

from medjax.data.readers.ct import scale_intensity
from medjax.tasks.fvlm_data import HU_RANGE, PAD_VALUE
from medjax.tasks.visd_data import OrganWindowExample, organ_window


def _scan():
    volume = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14) + 1.0  # no zero inside the volume
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[0:3, 1:4, 10:14] = 1  # a corner organ: its window pads on the low D, low H and high W sides
    mask[4:8, 5:9, 3:7] = 2  # a central organ
    mask[0:10, 0:12, 0:2] = 3  # an organ larger than the window along D and H
    return volume, mask


def test_window_is_centred_on_the_organ_box_and_padded_at_volume_edges():
    volume, mask = _scan()
    window = (6, 6, 6)
    got_volume, got_mask, fraction = organ_window(volume, mask, 1, window)
    # box D 0..2, H 1..3, W 10..13 -> centres (0+3)//2=1, (1+4)//2=2, (10+14)//2=12 -> starts -2, -1, 9
    want = np.zeros(window, np.float32)
    want[2:6, 1:6, 0:5] = volume[0:4, 0:5, 9:14]
    np.testing.assert_array_equal(got_volume, want)
    want_mask = np.zeros(window, np.uint8)
    want_mask[2:6, 1:6, 0:5] = mask[0:4, 0:5, 9:14]
    np.testing.assert_array_equal(got_mask, want_mask)
    assert fraction == 1.0
    box = np.argwhere(got_mask == 1)
    np.testing.assert_array_equal((box.min(0) + box.max(0) + 1) // 2, np.asarray(window) // 2)  # centred
    # outside the volume: PAD_VALUE = 0 = HU -1150 after the window (the original pads 0 after it), background mask
    assert PAD_VALUE == 0.0 and scale_intensity(np.asarray([-1150.0, -2000.0]), HU_RANGE).tolist() == [0.0, 0.0]
    assert (got_volume[:2] == 0).all() and (got_volume[:, 0] == 0).all() and (got_volume[..., 5] == 0).all()

    central, central_mask, fraction = organ_window(volume, mask, 2, window)  # wholly inside: no padding
    np.testing.assert_array_equal(central, volume[3:9, 4:10, 2:8])  # centres 6, 7, 5 -> starts 3, 4, 2
    np.testing.assert_array_equal(central_mask, mask[3:9, 4:10, 2:8])
    assert fraction == 1.0


def test_fraction_and_intact_flags():
    volume, mask = _scan()
    _, got_mask, fraction = organ_window(volume, mask, 3, (6, 6, 6))  # 10 x 12 organ, 6 x 6 window
    assert fraction == pytest.approx((6 * 6 * 2) / (10 * 12 * 2))
    assert (got_mask == 3).sum() == 6 * 6 * 2
    _, _, absent = organ_window(volume, mask, 4, (6, 6, 6))
    assert absent == 0.0
    example = OrganWindowExample((6, 6, 6), num_organs=4, min_fraction=0.9)({"volume": volume, "mask": mask})
    assert example["volumes"].shape == (4, 6, 6, 6, 1) and example["masks"].shape == (4, 6, 6, 6)
    np.testing.assert_array_equal(example["intact"], [True, True, False, False])  # 30% of organ 3; no organ 4
    np.testing.assert_array_equal(example["volumes"][1, ..., 0], volume[3:9, 4:10, 2:8])
    with pytest.raises(ValueError, match="one shape"):
        organ_window(volume, mask[:-1], 1, (6, 6, 6))
