"""Issue #15 (reliability), item 5: content that was accepted without a word - duplicate fundus
manifest rows, empty image-report captions, CT labels on air. Tiny files in the real formats."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from medjax.data.readers import ct
from medjax.data.pipelines import ct as cp
from medjax.data.errors import DataError, DataWarning
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.readers.image_report import ImageReportDataset


# ---------------------------------------------------------------- fundus manifest duplicates
def _fundus(tmp_path, rows):
    os.makedirs(tmp_path / "img", exist_ok=True)
    for name in {r[2] for r in rows}:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / name)
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["participant_id", "eye", "image_path"]] + rows)
    return str(tmp_path)


BASE = [["p1", "left", "img/1l.png"], ["p1", "right", "img/1r.png"], ["p2", "left", "img/2l.png"]]


@pytest.mark.parametrize("extra, message", [
    (["p1", "right", "img/1r.png"], r"line 5: repeats line 3 exactly"),
    (["p1", "left", "img/other.png"], r"line 5: participant_id 'p1' \+ eye 'left' repeats line 2"),
    (["p3", "left", "img/2l.png"], r"line 5: image_path 'img/2l.png' repeats line 4"),
])
def test_fundus_duplicates_are_an_error_unless_allowed(tmp_path, extra, message):
    root = _fundus(tmp_path, BASE + [extra])
    with pytest.raises(DataError, match=r"manifest\.csv: " + message + r" \(1 duplicate row\(s\) in all\).*"
                                        r"allow_duplicates=True"):
        FundusGenomeDataset(root, image_size=8, genotypes=None)
    with pytest.warns(DataWarning, match=r"manifest\.csv: 1 duplicate row\(s\) of 4, first: " + message):
        ds = FundusGenomeDataset(root, image_size=8, genotypes=None, allow_duplicates=True)
    assert len(ds) == 4


def test_fundus_without_duplicates_is_silent(tmp_path):
    root = _fundus(tmp_path, BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(FundusGenomeDataset(root, image_size=8, genotypes=None)) == 3


def test_fundus_label_outside_the_classes_is_refused(tmp_path):
    os.makedirs(tmp_path / "img")
    rows = [["p1", "left", "img/1l.png", "4"], ["p2", "left", "img/2l.png", "7"]]
    for _, _, name, _ in rows:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / name)
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["participant_id", "eye", "image_path", "label"]] + rows)
    assert len(FundusGenomeDataset(str(tmp_path), image_size=8, genotypes=None, label_arity=1)) == 2
    with pytest.raises(DataError, match=r"manifest\.csv: line 3: field 'label' = '7': expected a class index in "
                                        r"\[0, 5\)"):
        FundusGenomeDataset(str(tmp_path), image_size=8, genotypes=None, label_arity=1, num_classes=5)


def test_fundus_duplicate_count(tmp_path):
    root = _fundus(tmp_path, BASE + BASE + [["p2", "left", "img/x.png"]])
    with pytest.raises(DataError, match=r"line 5: repeats line 2 exactly \(4 duplicate row\(s\) in all\)"):
        FundusGenomeDataset(root, image_size=8, genotypes=None)


# ---------------------------------------------------------------- image-report captions
def _jsonl(tmp_path, rows):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("captions, message", [
    ([""], r"caption 0 of 1 is empty"),
    ("   ", r"caption 0 of 1 is empty"),
    (["Fine.", " \n"], r"caption 1 of 2 is empty"),
    (["", "x", ""], r"caption 0 of 3 is empty \(2 empty\)"),
])
def test_empty_captions_are_refused(tmp_path, captions, message):
    path = _jsonl(tmp_path, [{"image": "a.png", "captions": ["ok"]}, {"image": "a.png", "captions": captions}])
    with pytest.raises(DataError, match=r"r\.jsonl: line 2: field 'captions': " + message):
        ImageReportDataset(path)


def test_image_only_sets_need_no_captions(tmp_path):
    path = _jsonl(tmp_path, [{"image": "a.png"}])
    assert len(ImageReportDataset(path, caption_field=None)) == 1


def test_empty_caption_in_arrow_file(tmp_path):
    from medjax.data.readers.arrow_write import write_arrow
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG")
    path = str(tmp_path / "t.arrow")
    write_arrow(path, {"image": [buf.getvalue()] * 2, "caption": [["A."], ["B.", ""]],
                       "image_id": ["0", "1"], "split": ["train", "train"]})
    with pytest.raises(DataError, match=r"t\.arrow: row 1: field 'caption': caption 1 of 2 is empty"):
        ImageReportDataset(path)


# ---------------------------------------------------------------- CT label on air
def _nifti(path, data, affine=None):
    ct.save_nifti(str(path), data, np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine)
    return str(path)


def _body(shape=(12, 12, 8)):
    hu = np.full(shape, -1000, np.int16)
    hu[3:9, 3:9, :] = 40  # a soft-tissue block surrounded by air
    return hu


def test_label_on_body_is_accepted(tmp_path):
    hu = _body()
    label = np.zeros(hu.shape, np.uint8)
    label[4:8, 4:8, 2:6] = 6
    image, lab = _nifti(tmp_path / "img.nii.gz", hu), _nifti(tmp_path / "lab.nii.gz", label)
    volume, out, _ = ct.load_ct_pair(image, lab)
    assert (out == 6).sum() == 64 and volume.max() > 0.4


def test_label_on_air_is_refused(tmp_path):
    hu = _body()
    label = np.zeros(hu.shape, np.uint8)
    label[0:3, 0:12, :] = 6  # liver drawn entirely in the air beside the body
    label[4:6, 4:6, 0:2] = 1  # a little on tissue
    image, lab = _nifti(tmp_path / "img.nii.gz", hu), _nifti(tmp_path / "lab.nii.gz", label)
    with pytest.raises(ct.CTDataError, match=r"lab\.nii\.gz: 288 of 296 labelled voxels \(97%; lungs not counted\) lie "
                                             r"where its image .*img\.nii\.gz is air \(< -900 HU\).*class 6: 288"):
        ct.load_ct_pair(image, lab)
    ct.load_ct_pair(image, lab, check_air=False)  # the switch
    whole_air = _nifti(tmp_path / "air.nii.gz", np.full(hu.shape, -1024, np.int16))
    ones = _nifti(tmp_path / "ones.nii.gz", np.ones(hu.shape, np.uint8))
    with pytest.raises(ct.CTDataError, match=r"ones\.nii\.gz: 1152 of 1152 labelled voxels \(100%"):
        ct.load_ct_pair(whole_air, ones)


def test_half_or_less_on_air_and_lungs_are_accepted(tmp_path):
    hu = _body()
    label = np.zeros(hu.shape, np.uint8)
    label[3:9, 3:9, 0:4] = 6  # 144 on tissue
    label[0:3, 0:6, 0:8] = 2  # 144 on air: exactly half, not more
    image, lab = _nifti(tmp_path / "img.nii.gz", hu), _nifti(tmp_path / "lab.nii.gz", label)
    ct.load_ct_pair(image, lab)
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[0:3, :, :] = 16  # lungs are air-filled: not counted
    lungs[4:5, 4:5, 0:1] = 6
    ct.load_ct_pair(image, _nifti(tmp_path / "lungs.nii.gz", lungs))


def test_ct_cache_error_names_the_list_line(tmp_path):
    root = tmp_path / "data"
    (root / "01_BTCV").mkdir(parents=True)
    label = np.ones((12, 12, 8), np.uint8)
    _nifti(root / "01_BTCV" / "img1.nii.gz", np.full((12, 12, 8), -1000, np.int16))
    _nifti(root / "01_BTCV" / "lab1.nii.gz", label)
    (root / "train.txt").write_text("01_BTCV/img1.nii.gz\t01_BTCV/lab1.nii.gz\n")
    cases = cp.read_ct_list(str(root / "train.txt"), str(root))
    with pytest.raises(ct.CTDataError, match=r"train\.txt: line 1: .*lab1\.nii\.gz: 1152 of 1152 labelled voxels"):
        cp.CTVolumeCache(str(tmp_path / "cache")).load(cases[0])
