import os
import time
import warnings

import nibabel as nib
import numpy as np
import pytest

from medjax.data.readers import ct
from medjax.data.pipelines import ct as cp
from medjax.ontology import universal_classes as templates
from medjax.data.demo.ct import make_ct_demo

CROP = cp.CTAugment(crop_size=(16, 16, 16))


@pytest.fixture(scope="module")
def ct_demo(tmp_path_factory):
    start = time.perf_counter()
    root = make_ct_demo(str(tmp_path_factory.mktemp("ct_demo")), cases_per_dataset=2, multi_organ_cases=2, seed=0)
    assert time.perf_counter() - start < 10.0
    return root


def _centroid(mask, affine):
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def test_demo_has_partial_labels_from_several_datasets_with_real_geometry(ct_demo):
    cases = cp.read_ct_list(os.path.join(ct_demo, "train.txt"), ct_demo) + cp.read_ct_list(
        os.path.join(ct_demo, "val.txt"), ct_demo)
    assert len(cases) == 10
    ids = {case.dataset_id for case in cases}
    assert ids == {"01", "04", "05", "10_07", "10_09"}
    axcodes = {nib.aff2axcodes(nib.load(case.image).affine) for case in cases}
    assert {("L", "P", "S"), ("I", "P", "L"), ("R", "A", "S")} <= axcodes  # dcm2niix-style, KiTS-style, RAS
    label_sets = {}
    for case in cases:
        volume, label, affine = ct.load_ct_pair(case.image, case.label)
        present = set(np.unique(label).tolist()) - {0}
        assert present <= set(templates.TEMPLATES[case.dataset_id])
        label_sets.setdefault(case.dataset_id, set()).update(present)
        assert 0.3 < (volume > 0).mean() < 0.7  # a body surrounded by air
        centre = {c: _centroid(label == c, affine) for c in present}
        if {6, 1} <= present:  # RAS world: the liver lies to the patient's right (+x) of the spleen
            assert centre[6][0] > centre[1][0] + 20
        if {2, 3} <= present:
            assert centre[2][0] > centre[3][0] + 20
        if {8, 9} <= present:  # aorta left of the vena cava
            assert centre[8][0] < centre[9][0]
        for lesion in present & templates.TUMOUR_CLASSES:  # tumours sit inside the body, HU differs from organ
            assert volume[label == lesion].mean() < 0.75
    assert label_sets["01"] >= set(range(1, 12)) and label_sets["04"] == {6, 27}
    assert label_sets["05"] == {2, 3, 26, 32} and label_sets["10_07"] == {11, 28} and label_sets["10_09"] == {1}


def test_dataset_ids_from_paths():
    assert cp.dataset_id_of("01_Multi-Atlas_Labeling/img/img0001.nii.gz") == "01"
    assert cp.dataset_id_of("10_Decathlon/Task03_Liver/imagesTr/liver_1.nii.gz") == "10_03"
    assert cp.dataset_id_of("14_FELIX/img/x.nii.gz") == "14"
    assert cp.dataset_id_of("10_Decathlon/imagesTr/liver_1.nii.gz") is None
    assert cp.dataset_id_of("99_Unknown/a.nii.gz") is None


def test_list_file_errors_name_the_file_and_line(ct_demo, tmp_path):
    good = open(os.path.join(ct_demo, "train.txt")).read().splitlines()[0]
    image_rel, label_rel = good.split("\t")
    bad_lines = {
        "one field": (image_rel, r"line 2: .* has 1 field\(s\); expected 'image<TAB>label'"),
        "missing": (f"{image_rel}\t01_Multi-Atlas_Labeling/label/nope.nii.gz",
                    r"line 2: label file .*nope.nii.gz not found"),
        "unknown id": ("99_Other/img.nii.gz\tlabel.nii.gz",
                       r"line 2: image path '99_Other/img.nii.gz' does not start with a known dataset id"),
        "other dataset": (f"{image_rel}\t04_LiTS/label/liver_1.nii.gz",
                          r"line 2: label path .* is not in the image's dataset 01"),
    }
    for name, (line, pattern) in bad_lines.items():
        path = tmp_path / f"{name.replace(' ', '_')}.txt"
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(ct.CTDataError, match=rf"{path.name}: {pattern}"):
            cp.read_ct_list(str(path), ct_demo)
    # a label whose header disagrees with its image (a KiTS IPL label paired with a BTCV LPS image)
    os.makedirs(tmp_path / "01_x", exist_ok=True)
    os.symlink(os.path.join(ct_demo, "05_KiTS/label/label0001.nii.gz"), tmp_path / "01_x" / "label.nii.gz")
    os.symlink(os.path.join(ct_demo, image_rel), tmp_path / "01_x" / "image.nii.gz")
    (tmp_path / "pair.txt").write_text("01_x/image.nii.gz\t01_x/label.nii.gz\n")
    with pytest.raises(ct.CTDataError, match=r"pair.txt: line 1: .*label.nii.gz: label shape \(32, 48, 48\) does not"):
        cp.read_ct_list(str(tmp_path / "pair.txt"), str(tmp_path))


def test_tumours_count_as_their_organ_and_unlabelled_classes_are_marked():
    label = np.zeros((12, 6, 6), np.uint8)
    label[8:11, 1:5, 1:5] = 2  # right kidney (RAS: large x)
    label[1:4, 1:5, 1:5] = 3  # left kidney
    label[4, 2:4, 2:4] = 26  # a tumour touching the left kidney
    label[9, 2:4, 2:4] = 32  # a cyst inside the right kidney
    organ, tumour = cp.split_tumours(label, "05")
    assert (organ[4, 2:4, 2:4] == 3).all() and (organ[9, 2:4, 2:4] == 2).all()
    assert set(np.unique(tumour)) == {0, 26, 32}
    channels, mask = cp.label_channels(organ, tumour, "05")
    assert channels.shape == (12, 6, 6, 32) and channels.dtype == np.uint8
    np.testing.assert_array_equal(np.flatnonzero(mask) + 1, [2, 3, 26, 32])
    assert channels[..., ~mask].sum() == 0  # unannotated classes: empty and masked out
    np.testing.assert_array_equal(channels[..., 2], (label == 3) | (label == 26))  # left kidney incl. its tumour
    np.testing.assert_array_equal(channels[..., 25], label == 26)
    liver = np.zeros((4, 4, 4), np.uint8)
    liver[1:3, 1:3, 1:3] = 6
    liver[1, 1, 1] = 27
    organ, tumour = cp.split_tumours(liver, "04")
    channels, mask = cp.label_channels(organ, tumour, "04")
    assert channels[..., 5].sum() == 8 and channels[..., 26].sum() == 1 and mask.sum() == 2
    with pytest.raises(ct.CTDataError, match=r"case.nii.gz: label values \[5\] are not classes of dataset 04"):
        cp.split_tumours(np.full((2, 2, 2), 5, np.uint8), "04", "case.nii.gz")


def _sampling_volume():
    image = np.full((30, 30, 30), 0.5, np.float32)
    image[:, :, :6] = 0.0  # "air": never a negative centre
    organ = np.zeros(image.shape, np.uint8)
    tumour = np.zeros(image.shape, np.uint8)
    organ[10:20, 10:20, 10:20] = 6
    tumour[14:16, 14:16, 14:16] = 27
    organ[tumour > 0] = 6
    return image, organ, tumour, cp._counts(organ, tumour, image > 0)


def test_crop_centres_positive_negative_two_to_one():
    image, organ, tumour, counts = _sampling_volume()
    rng = np.random.default_rng(0)
    centres = np.array([cp.choose_crop_center(image, organ, tumour, counts, rng) for _ in range(3000)])
    positive = organ[tuple(centres.T)] > 0
    assert abs(positive.mean() - 2 / 3) < 0.03  # binomial sd 0.009
    negatives = centres[~positive]
    assert (image[tuple(negatives.T)] > 0).all()
    assert np.ptp(negatives, axis=0).min() > 20  # spread over the whole background
    empty = np.zeros_like(organ)  # no labelled voxel: every centre is a negative one
    only_negative = np.array([cp.choose_crop_center(image, empty, empty, cp._counts(empty, empty, image > 0), rng)
                              for _ in range(50)])
    assert (image[tuple(only_negative.T)] > 0).all()
    no_negative = {**counts, "negative": 0}  # and no background: every centre is a positive one
    only_positive = np.array([cp.choose_crop_center(image, organ, tumour, no_negative, rng) for _ in range(50)])
    assert (organ[tuple(only_positive.T)] > 0).all()
    air = np.zeros_like(image)
    with pytest.raises(ct.CTDataError, match="case7.nii.gz: no crop centre available"):
        cp.choose_crop_center(air, empty, empty, cp._counts(empty, empty, air > 0), rng, source="case7.nii.gz")


def test_crop_centres_by_class_one_one_five():
    image, organ, tumour, counts = _sampling_volume()
    rng = np.random.default_rng(1)
    centres = np.array([cp.choose_crop_center(image, organ, tumour, counts, rng, class_ratios=(1, 1, 5))
                        for _ in range(3500)])
    kind = np.where(tumour[tuple(centres.T)] > 0, 2, np.where(organ[tuple(centres.T)] > 0, 1, 0))
    np.testing.assert_allclose(np.bincount(kind, minlength=3) / len(kind), [1 / 7, 1 / 7, 5 / 7], atol=0.03)
    no_tumour = {**counts, "class_2": 0}
    kind = [int(organ[c] > 0) for c in (cp.choose_crop_center(image, organ, tumour * 0, no_tumour, rng,
                                                              class_ratios=(1, 1, 5)) for _ in range(1000))]
    assert abs(np.mean(kind) - 0.5) < 0.06  # an empty class gets ratio 0


def test_zoom_matches_monai():
    from monai.transforms import Zoom
    rng = np.random.default_rng(0)
    image = rng.random((13, 10, 11)).astype(np.float32)
    label = rng.integers(0, 4, (13, 10, 11)).astype(np.uint8)
    zoomed, (zoomed_label,) = cp.zoom_keep_size(image, [label], 1.37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = Zoom(1.37, mode="area", keep_size=True)(image[None])[0].numpy()
        expected_label = Zoom(1.37, mode="nearest", keep_size=True)(label[None].astype(np.float32))[0].numpy()
    np.testing.assert_allclose(zoomed, expected, atol=1e-6)
    np.testing.assert_array_equal(zoomed_label, expected_label)


def test_decathlon_crops_are_zoomed_and_class_balanced():
    image, organ, tumour, counts = _sampling_volume()
    example = {"image": image, "organ": organ, "tumour": tumour, "meta": {"counts": counts}, "dataset_id": "10_03"}
    zoomed = cp.CTTrainTransform(cp.CTAugment(crop_size=(30, 30, 30), zoom_prob=1.0, rotate90_prob=0.0, shift_prob=0.0))
    out = zoomed(example, np.random.default_rng(0))
    factor_rng = np.random.default_rng(0)
    factor_rng.random()
    expected, (expected_organ, _) = cp.zoom_keep_size(image, (organ, tumour), factor_rng.uniform(1.3, 1.5))
    np.testing.assert_array_equal(out["image"][..., 0], expected)  # crop = whole (zoomed) volume here
    np.testing.assert_array_equal(out["label"][..., 5], expected_organ == 6)
    assert out["label"][..., 5].sum() >= 2 * organ.astype(bool).sum()  # the liver grew by >= 1.3 ** 3
    np.testing.assert_array_equal(np.flatnonzero(out["label_mask"]) + 1, [6, 27])


def test_window_and_padding_for_volumes_smaller_than_the_crop():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1
    window = cp.extract_window(array, (-1, 0, 2), (4, 3, 3))
    assert window.shape == (4, 3, 3)
    np.testing.assert_array_equal(window[1:3, :, :2], array[:, :, 2:])
    assert window[0].sum() == 0 and window[3].sum() == 0 and window[:, :, 2].sum() == 0
    example = {"image": np.full((6, 20, 5), 0.5, np.float32), "organ": np.zeros((6, 20, 5), np.uint8),
               "tumour": np.zeros((6, 20, 5), np.uint8), "dataset_id": "10_09"}
    example["organ"][2:4, 8:12, 1:4] = 1
    example["meta"] = {"counts": cp._counts(example["organ"], example["tumour"], example["image"] > 0)}
    out = cp.CTTrainTransform(cp.CTAugment(crop_size=(8, 8, 8), zoom_prob=0.0, rotate90_prob=0.0, shift_prob=0.0))(
        example, np.random.default_rng(0))
    assert out["image"].shape == (8, 8, 8, 1) and out["label"].shape == (8, 8, 8, 32)
    # symmetric padding: x gets 1 + 1 zeros, z gets 1 + 2
    assert (out["image"][0] == 0).all() and (out["image"][7] == 0).all() and (out["image"][1:7, :, 1:6] == 0.5).all()
    assert (out["image"][:, :, 0] == 0).all() and (out["image"][:, :, 6:] == 0).all()


def test_rotate_and_shift_augmentations():
    image, organ, tumour, counts = _sampling_volume()
    image = image + np.random.default_rng(3).random(image.shape).astype(np.float32) * 0.1
    example = {"image": image, "organ": organ, "tumour": tumour, "meta": {"counts": counts}, "dataset_id": "01"}
    plain = cp.CTTrainTransform(cp.CTAugment(crop_size=(12, 12, 12), rotate90_prob=0.0, shift_prob=0.0))
    augmented = cp.CTTrainTransform(cp.CTAugment(crop_size=(12, 12, 12), rotate90_prob=1.0, shift_prob=1.0))
    turns = set()
    for seed in range(12):
        a = plain(example, np.random.default_rng(seed))
        b = augmented(example, np.random.default_rng(seed))  # same crop (same draws up to the rotation)
        for k in (1, 2, 3):
            delta = b["image"] - np.rot90(a["image"], k, axes=(0, 1))
            if np.ptp(delta) < 1e-6:
                assert 0 < abs(float(delta.mean())) <= 0.1
                np.testing.assert_array_equal(b["label"], np.rot90(a["label"], k, axes=(0, 1)))
                turns.add(k)
                break
        else:
            raise AssertionError(f"seed {seed}: not a 90-degree rotation plus a constant shift")
    assert turns == {1, 2, 3}


def test_training_batches_cache_and_determinism(ct_demo, tmp_path, monkeypatch):
    calls = []
    original = cp.preprocess_ct
    monkeypatch.setattr(cp, "preprocess_ct", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    list_path = os.path.join(ct_demo, "train.txt")
    cache = str(tmp_path / "cache")
    make = lambda seed: cp.ct_train_dataset(list_path, root=ct_demo, cache_dir=cache, global_batch=2, seed=seed,
                                            augment=CROP, num_epochs=2, prefetch_threads=0)
    batches = list(make(0))
    assert len(batches) == 5 * 2 // 2  # 5 training cases, 2 epochs, batch 2
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 5  # preprocessed once, reused in epoch 2
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 5
    assert all(os.path.isfile(os.path.join(cache, d, "image.npy")) for d in os.listdir(cache))
    template_masks = {tuple(np.isin(np.arange(1, 33), classes)) for classes in templates.TEMPLATES.values()}
    for batch in batches:
        assert batch["image"].shape == (2, 16, 16, 16, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (2, 16, 16, 16, 32) and batch["label"].dtype == np.uint8
        assert batch["label_mask"].shape == (2, 32) and batch["label_mask"].dtype == bool
        assert set(np.unique(batch["label"])) <= {0, 1}
        assert -0.1 <= batch["image"].min() and batch["image"].max() <= 1.1
        for label, mask in zip(batch["label"], batch["label_mask"]):
            assert tuple(mask) in template_masks
            assert label[..., ~mask].sum() == 0
    positive = np.mean([b["label"][i].any() for b in batches for i in range(2)])
    assert positive >= 0.5  # about 2/3 of the crops are centred on a labelled voxel
    again = list(make(0))
    for x, y in zip(batches, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other = next(iter(make(1)))
    assert not np.array_equal(other["image"], batches[0]["image"])
    assert len(calls) == 5  # the second and third datasets read only the cache


def test_labels_outside_the_template_fail_naming_the_file(ct_demo, tmp_path):
    case = next(c for c in cp.read_ct_list(os.path.join(ct_demo, "train.txt"), ct_demo) if c.dataset_id == "04")
    data, affine = ct.read_nifti(case.label)
    bad_label = str(tmp_path / "04_LiTS_label.nii.gz")
    ct.save_nifti(bad_label, np.where(data > 0, 1, 0).astype(np.uint8), affine)  # dataset-local ids
    cache = cp.CTVolumeCache(str(tmp_path / "cache"))
    with pytest.raises(ct.CTDataError, match=r"04_LiTS_label.nii.gz: label values \[1\] are not classes of dataset 04"):
        cache.load(cp.CTCase(case.image, bad_label, "04", "test"))


def _small_pair(root):
    hu = np.full((12, 10, 8), -1000, np.int16)
    hu[2:10, 2:8, 1:7] = 60
    hu[4:7, 3:6, 2:5] = 150
    label = np.zeros(hu.shape, np.uint8)
    label[4:7, 3:6, 2:5] = 6  # liver
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    ct.save_nifti(str(root / "img.nii.gz"), hu, affine)
    ct.save_nifti(str(root / "lab.nii.gz"), label, affine)
    return cp.CTCase(str(root / "img.nii.gz"), str(root / "lab.nii.gz"), "04", "test")


def test_cache_key_follows_the_preprocessing(tmp_path, monkeypatch):
    """Unchanged preprocessing reuses the entry; a changed spacing, HU window or PREPROCESS_VERSION writes a
    new one instead of reading the stale entry."""
    from medjax.data.transforms import ct_preprocess

    case, cache_dir, calls = _small_pair(tmp_path), str(tmp_path / "cache"), []
    original = cp.preprocess_ct
    monkeypatch.setattr(cp, "preprocess_ct", lambda *a, **k: calls.append(k["preprocessing"]) or original(*a, **k))
    load = lambda **kw: cp.CTVolumeCache(cache_dir, **kw).load(case)  # noqa: E731
    first = load()
    again = load(spacing=[1.5, 1.5, 1.5], hu_range=(-175, 250))  # the defaults, spelled otherwise: a hit
    assert len(calls) == 1
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].shape == (8, 6, 6)  # the foreground crop
    assert first["meta"]["preprocessing"] == {"spacing": [1.5, 1.5, 1.5], "hu_range": [-175.0, 250.0],
                                              "version": ct_preprocess.PREPROCESS_VERSION}
    coarse = load(spacing=(3.0, 3.0, 3.0))
    assert len(calls) == 2 and coarse["image"].shape == (4, 3, 3)
    window = load(hu_range=(-100.0, 200.0))
    assert len(calls) == 3
    for volume, (low, high) in ((first, (-175, 250)), (window, (-100, 200))):  # 60 and 150 HU, scaled
        np.testing.assert_allclose([volume["image"].min(), volume["image"].max()],
                                   [(60 - low) / (high - low), (150 - low) / (high - low)], rtol=1e-6)
    monkeypatch.setattr(ct_preprocess, "PREPROCESS_VERSION", ct_preprocess.PREPROCESS_VERSION + 1)
    load()
    assert len(calls) == 4 and len(os.listdir(cache_dir)) == 4
    load()
    assert len(calls) == 4
