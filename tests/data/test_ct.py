import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from medjax.data.readers import ct

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


@pytest.fixture(scope="module")
def monai_pipeline():
    """MONAI's LoadImage -> Orientation("RAS") -> Spacing -> [ScaleIntensityRange] on a file: (array, affine)."""
    from monai.transforms import Compose, LoadImage, Orientation, ScaleIntensityRange, Spacing

    def run(path, spacing, hu_range=None, mode="bilinear"):
        steps = [LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader"),
                 Orientation(axcodes="RAS"), Spacing(pixdim=spacing, mode=mode)]
        if hu_range is not None:
            steps.append(ScaleIntensityRange(a_min=hu_range[0], a_max=hu_range[1], b_min=0.0, b_max=1.0, clip=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = Compose(steps)(path)
        return out[0].numpy(), out.affine.numpy()

    return run


@pytest.fixture(scope="module")
def oblique_file(tmp_path_factory):
    """nibabel's example4d.nii.gz (a real oblique LAS acquisition), first volume, as a 3D file."""
    image = nib.load(os.path.join(NIBABEL_DATA, "example4d.nii.gz"))
    path = str(tmp_path_factory.mktemp("oblique") / "oblique.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine), path)
    return path


@pytest.fixture(scope="module")
def lps_file(tmp_path_factory):
    """A synthetic axis-permuted, flipped (IPL: stored z, y, x like KiTS19), oblique-free CT with
    anisotropic voxels and a marker blob at world (10, -8, 30) mm."""
    rng = np.random.default_rng(0)
    shape, spacing = (20, 26, 30), (2.5, 0.9, 1.1)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = -spacing[0], -spacing[1], -spacing[2], 1.0
    affine[:3, 3] = (14.0, 3.0, 40.0)
    hu = rng.normal(0, 40, shape)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape((3,) + shape)
    hu[np.sum((world - np.array([10.0, -8.0, 30.0])[:, None, None, None]) ** 2, axis=0) < 4.0 ** 2] = 400.0
    path = str(tmp_path_factory.mktemp("ipl") / "ipl.nii.gz")
    ct.save_nifti(path, hu.astype(np.int16), affine)
    return path


@pytest.mark.parametrize("name, spacing, hu_range", [
    ("anatomical.nii", (1.5, 1.5, 1.5), (0.0, 15000.0)),  # LAS, 2 mm
    ("anatomical.nii", (3.0, 1.3, 2.5), (2000.0, 12000.0)),  # down- and upsampling, saturating window
    ("reoriented_anat_moved.nii", (1.5, 2.0, 3.0), (0.0, 15000.0)),  # RAS, 4 mm, float
    ("standard.nii.gz", (0.7, 1.1, 1.5), (0.0, 255.0)),  # sform only, anisotropic
])
def test_load_ct_equals_monai_on_nibabel_files(monai_pipeline, name, spacing, hu_range):
    path = os.path.join(NIBABEL_DATA, name)
    expected, expected_affine = monai_pipeline(path, spacing, hu_range)
    volume, affine = ct.load_ct(path, spacing=spacing, hu_range=hu_range)
    assert volume.dtype == np.float32 and volume.shape == expected.shape
    np.testing.assert_allclose(affine, expected_affine, atol=1e-9)
    np.testing.assert_allclose(volume, expected, atol=1e-5)
    assert 0.0 <= volume.min() and volume.max() <= 1.0 and 0.0 < volume.mean() < 1.0
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), spacing)


@pytest.mark.parametrize("spacing", [(2.5, 2.5, 2.5), (2.0, 2.0, 2.0)])
def test_load_ct_equals_monai_on_oblique_file(monai_pipeline, oblique_file, spacing):
    expected, expected_affine = monai_pipeline(oblique_file, spacing, (0.0, 1000.0))
    volume, affine = ct.load_ct(oblique_file, spacing=spacing, hu_range=(0.0, 1000.0))
    assert volume.shape == expected.shape
    np.testing.assert_allclose(affine, expected_affine, atol=1e-9)
    np.testing.assert_allclose(volume, expected, atol=1e-5)
    assert abs(affine[1, 2]) > 0.1  # the obliquity (rotation) is kept, only the zooms change


def test_load_ct_on_permuted_flipped_volume(monai_pipeline, lps_file):
    expected, expected_affine = monai_pipeline(lps_file, (1.5, 1.5, 1.5), (-175.0, 250.0))
    volume, affine = ct.load_ct(lps_file)
    assert volume.shape == expected.shape == (22, 16, 33)  # (x, y, z) = round((n - 1) * s / 1.5 + 1)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-9)
    np.testing.assert_allclose(volume, expected, atol=1e-5)
    np.testing.assert_allclose(affine[:3, :3], np.diag([1.5, 1.5, 1.5]))
    # the marker at world (10, -8, 30) mm lands at the RAS voxel that affine maps there
    marker = np.argwhere(volume >= 0.99).mean(axis=0)
    np.testing.assert_allclose(affine[:3, :3] @ marker + affine[:3, 3], (10.0, -8.0, 30.0), atol=0.5)


def test_native_spacing_is_not_resampled():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")
    volume, affine = ct.load_ct(path, spacing=(2.0, 2.0, 2.0005), hu_range=(0.0, 15000.0))
    data, raw_affine = ct.read_nifti(path)
    np.testing.assert_array_equal(volume, ct.scale_intensity(data[::-1].astype(np.float32), (0.0, 15000.0)))
    np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(affine[:3, 3], raw_affine[:3, :3] @ [32, 0, 0] + raw_affine[:3, 3])


def _tie_free(shape_out, xform, tol=1e-6):
    """Voxels whose (axis-aligned) source coordinates are not exact half-voxel ties."""
    keep = []
    for axis, n in enumerate(shape_out):
        coordinate = xform[axis, axis] * np.arange(n) + xform[axis, 3]
        keep.append(np.abs(coordinate - np.floor(coordinate) - 0.5) > tol)
    return np.ix_(*keep)


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (1.37, 2.9, 2.3)])
def test_label_nearest_resampling_keeps_values_and_matches_monai(monai_pipeline, tmp_path, spacing):
    image_path = os.path.join(NIBABEL_DATA, "anatomical.nii")
    data, affine = ct.read_nifti(image_path)
    classes = np.digitize(data, [4000, 8000, 10000, 12000]).astype(np.uint8) * np.uint8(7)  # values 0, 7, .., 28
    label_path = str(tmp_path / "label.nii.gz")
    ct.save_nifti(label_path, classes, affine)
    label, label_affine = ct.load_ct_label(label_path, spacing=spacing, reference=image_path)
    _, image_affine = ct.load_ct(image_path, spacing=spacing)
    assert label.dtype == np.uint8
    np.testing.assert_allclose(label_affine, image_affine)
    assert set(np.unique(label)) == set(np.unique(classes))
    expected, expected_affine = monai_pipeline(label_path, spacing, mode="nearest")
    assert label.shape == expected.shape
    ras_data, ras_affine = ct.reorient_to_ras(classes, affine)
    keep = _tie_free(label.shape, np.linalg.solve(ras_affine, label_affine))
    np.testing.assert_array_equal(label[keep], expected[keep])  # ties: torch rounds float noise, we halves-to-even
    assert label[keep].size > 0.3 * label.size


def test_nifti_round_trip_keeps_affine(tmp_path, lps_file):
    data, affine = ct.read_nifti(lps_file)
    path = str(tmp_path / "copy.nii")
    ct.save_nifti(path, data, affine)
    again, again_affine = ct.read_nifti(path)
    np.testing.assert_array_equal(again, data)
    np.testing.assert_allclose(again_affine, affine, atol=1e-5)
    header = nib.load(path).header
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)  # readers using the qform agree
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-5)


def _write(path, data, affine=np.diag([2.0, 2.0, 3.0, 1.0])):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_bad_inputs_raise_errors_naming_the_file(tmp_path):
    missing = str(tmp_path / "missing.nii.gz")
    with pytest.raises(ct.CTDataError, match="missing.nii.gz: file not found"):
        ct.load_ct(missing)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ct.CTDataError, match="garbage.nii: not a readable NIfTI"):
        ct.load_ct(str(garbage))
    functional = os.path.join(NIBABEL_DATA, "functional.nii")  # real 4D (17, 21, 3, 20)
    with pytest.raises(ct.CTDataError, match=r"functional.nii: image has shape \(17, 21, 3, 20\); expected a 3D"):
        ct.load_ct(functional)
    nans = os.path.join(NIBABEL_DATA, "resampled_anat_moved.nii")  # real file with NaN voxels
    with pytest.raises(ct.CTDataError, match="resampled_anat_moved.nii: 153 non-finite voxel"):
        ct.load_ct(nans)
    flat = _write(tmp_path / "slice.nii.gz", np.zeros((8, 8), np.int16))
    with pytest.raises(ct.CTDataError, match=r"slice.nii.gz: image has shape \(8, 8\)"):
        ct.load_ct(flat)


def test_label_mismatches_raise_errors_naming_both_files(tmp_path):
    image = _write(tmp_path / "image.nii.gz", np.zeros((8, 9, 10), np.int16))
    other_shape = _write(tmp_path / "short.nii.gz", np.zeros((8, 9, 9), np.uint8))
    with pytest.raises(ct.CTDataError, match=r"short.nii.gz: label shape \(8, 9, 9\) does not match its image .*image"):
        ct.load_ct_label(other_shape, reference=image)
    shifted = _write(tmp_path / "shifted.nii.gz", np.zeros((8, 9, 10), np.uint8), np.diag([2.0, 2.0, 3.5, 1.0]))
    with pytest.raises(ct.CTDataError, match=r"shifted.nii.gz: label affine .* does not match its image .*image"):
        ct.load_ct_label(shifted, reference=image)
    fractional = _write(tmp_path / "soft.nii.gz", np.full((8, 9, 10), 0.5, np.float32))
    with pytest.raises(ct.CTDataError, match="soft.nii.gz: label values must be integers"):
        ct.load_ct_label(fractional, reference=image)
    ok = _write(tmp_path / "ok.nii.gz", np.ones((8, 9, 10), np.uint8))
    volume, label, affine = ct.load_ct_pair(image, ok, spacing=(1.5, 1.5, 1.5))
    assert volume.shape == label.shape == (10, 12, 19) and (label == 1).all()
