"""fVLM data: per-organ texts (template, normal flag, encoder text), text ids, the organ crop's intact flags,
the TotalSegmentator label map, and bad inputs named (mask/volume shape mismatch, unknown organ label,
missing text), on a small ct_reports demo."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from medjax.data.demo.ct_reports import make_ct_reports_demo
from medjax.data.errors import DataError
from medjax.data.readers.ct import save_nifti
from medjax.errors import MedjaxInputError
from medjax.tasks.fvlm_data import (CTReportDataset, crop_organs, encoder_text, merge_totalsegmentator, organ_text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_ct_reports_demo(str(tmp_path_factory.mktemp("ct_reports")), num_train=6, num_valid=2,
                                shape=(26, 26, 12), seed=3)


def test_organ_text_template_and_encoder_text():
    text = organ_text("", "Heart size is normal.", "heart")
    assert text == "heart shows no significant abnormalities. Heart size is normal."
    assert encoder_text(text, "heart") == "Heart size is normal."
    assert encoder_text("heart shows no significant abnormalities.", "heart") == "heart shows no significant abnormalities."
    assert organ_text("Cardiomegaly.", "The heart is enlarged.", "heart") == "Cardiomegaly. The heart is enlarged."


def test_dataset_flags_and_text_ids(demo):
    ds = CTReportDataset(demo, "train")
    with open(os.path.join(demo, "train_conclusions.json")) as f:
        conclusions = json.load(f)
    for i, key in enumerate(ds.keys):
        assert ds.normal[i].tolist() == [conclusions[key][o] == "" for o in ds.organs]
    for j in range(len(ds.organs)):  # equal id <=> identical text
        for a in range(len(ds)):
            for b in range(len(ds)):
                assert (ds.text_ids[a, j] == ds.text_ids[b, j]) == (ds.texts[a][j] == ds.texts[b][j])
    item = ds[0]
    assert item["volume"].shape == item["mask"].shape and item["volume"].shape[0] == 12  # (D, H, W), D = z
    assert set(np.unique(item["mask"])) <= {0, 1, 2, 3, 4} and 0.0 <= item["volume"].min() <= item["volume"].max() <= 1.0
    assert item["labels"].tolist() == [float(not ds.normal[0][k]) for k in range(4)]  # demo: abnormal <=> label


def test_crop_intact_flags():
    mask = np.zeros((10, 40, 40), np.uint8)
    mask[2:8, 5:15, 5:15] = 1  # organ 1 near one corner
    mask[2:8, 25:35, 25:35] = 2  # organ 2 near the other
    volume = mask.astype(np.float32)
    _, cropped, intact = crop_organs(volume, mask, (10, 40, 40), 3, None)
    assert intact.tolist() == [True, True, False] and np.array_equal(np.bincount(cropped.ravel(), minlength=3)[1:3],
                                                                     [600, 600])
    _, cropped, intact = crop_organs(volume, mask, (10, 16, 16), 3, None)  # the centre crop cuts both
    assert intact.tolist() == [False, False, False]


def test_totalsegmentator_map():
    labels = np.array([0, 10, 14, 15, 51, 52, 61, 16, 90], np.uint8)
    assert merge_totalsegmentator(labels).tolist() == [0, 1, 1, 3, 2, 4, 2, 0, 0]


def _copy(demo, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(demo, out)
    return out


def test_mask_shape_mismatch_is_named(demo, tmp_path):
    root = _copy(demo, tmp_path)
    ds = CTReportDataset(root, "train")
    mask_path = ds.masks[0]
    image = nib.load(mask_path)
    save_nifti(mask_path, np.asarray(image.dataobj)[:, :, :-1], image.affine)
    with pytest.raises(MedjaxInputError, match="shape .* does not match"):
        ds[0]


def test_unknown_organ_label_is_named(demo, tmp_path):
    root = _copy(demo, tmp_path)
    ds = CTReportDataset(root, "train")
    image = nib.load(ds.masks[1])
    data = np.asarray(image.dataobj).copy()
    data[data == 4] = 9
    save_nifti(ds.masks[1], data, image.affine)
    with pytest.raises(DataError, match=r"label value 9 is not an anatomy"):
        ds[1]


def test_missing_text_is_named(demo, tmp_path):
    root = _copy(demo, tmp_path)
    path = os.path.join(root, "train_findings.json")
    with open(path) as f:
        findings = json.load(f)
    key = sorted(findings)[2]
    del findings[key]["aorta"]
    with open(path, "w") as f:
        json.dump(findings, f)
    with pytest.raises(DataError, match=rf"train_findings.json: scan '{key}': field 'aorta'"):
        CTReportDataset(root, "train")
