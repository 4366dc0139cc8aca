"""The one CT preprocessing (cache writer and `medjax.predict`): RAS, spacing, HU window, foreground crop."""
import numpy as np
import pytest

from medjax.data.readers import ct
from medjax.data.transforms.ct_preprocess import CTPreprocessing, preprocess_ct


def test_preprocess_crops_the_foreground_and_keeps_the_grid(tmp_path):
    hu = np.full((14, 12, 10), -1000, np.int16)  # LPS file: x and y flipped from RAS
    hu[3:11, 2:9, 1:8] = 75
    label = np.where(hu > 0, 6, 0).astype(np.uint8)
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = (20.0, 10.0, -5.0)
    image_path, label_path = str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz")
    ct.save_nifti(image_path, hu, affine)
    ct.save_nifti(label_path, label, affine)

    pre = preprocess_ct(image_path)
    assert pre.label is None and pre.grid_shape == (14, 12, 10)
    # RAS: x index 3..10 of the LPS file becomes 14 - 11 = 3 .. 10, y 2..8 becomes 3..9
    assert pre.box == (slice(3, 11), slice(3, 10), slice(1, 8))
    np.testing.assert_allclose(pre.image, (75 + 175) / 425, rtol=1e-6)
    np.testing.assert_allclose(pre.grid_affine, np.diag([1.5, 1.5, 1.5, 1.0]) + np.array(
        [[0, 0, 0, 20 - 13 * 1.5], [0, 0, 0, 10 - 11 * 1.5], [0, 0, 0, -5], [0, 0, 0, 0]]))
    np.testing.assert_allclose(pre.affine[:3, 3], pre.grid_affine[:3, 3] + 1.5 * np.array([3, 3, 1]))
    paired = preprocess_ct(image_path, label_path, preprocessing=CTPreprocessing((1.5, 1.5, 1.5), (-175, 250)))
    np.testing.assert_array_equal(paired.image, pre.image)  # the same volume with or without its label
    assert paired.box == pre.box and (paired.label == 6).all()


def test_settings_are_checked_and_fingerprinted():
    assert CTPreprocessing().fingerprint() == CTPreprocessing([1.5, 1.5, 1.5], [-175, 250]).fingerprint()
    assert CTPreprocessing().fingerprint() != CTPreprocessing(spacing=(1.0, 1.0, 1.0)).fingerprint()
    assert CTPreprocessing().fingerprint() != CTPreprocessing(hu_range=(-175, 300)).fingerprint()
    with pytest.raises(ValueError, match=r"spacing \(config data.spacing\) must be three positive numbers"):
        CTPreprocessing(spacing=(1.5, 0.0, 1.5))
    with pytest.raises(ValueError, match=r"hu_range \(config data.hu_range\) must be \(low, high\) HU, low < high"):
        CTPreprocessing(hu_range=(250, -175))
