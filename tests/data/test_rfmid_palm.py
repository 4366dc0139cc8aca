"""The RFMiD and PALM readers (ContIG's loaders' conventions) on the fundus_transfer demo and on hand-made files:
label columns and ContIG's three dropped, PALM's split equal to ContIG's StratifiedShuffleSplit code, its mask
convention (black = structure, a missing atrophy mask = none), and errors naming the file and field."""
import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from medjax.data.errors import DataError
from medjax.data.readers.palm import PALMDataset, palm_split
from medjax.data.readers.rfmid import CONTIG_DROPPED, RFMID_LABELS, RFMiDDataset


@pytest.fixture(scope="module")
def transfer_demo(demo_roots):
    return demo_roots("fundus_transfer")


def test_rfmid_layout_and_contig_labels(transfer_demo):
    root = os.path.join(transfer_demo, "rfmid")
    header = next(csv.reader(open(os.path.join(root, "Training_Set/Training_Set/RFMiD_Training_Labels.csv"))))
    assert header == ["ID", *RFMID_LABELS] and len(RFMID_LABELS) == 46
    train = RFMiDDataset(root, "train", image_size=32)
    assert train.num_labels == 43 and not set(CONTIG_DROPPED) & set(train.label_names)
    assert train.label_names[:3] == ("DR", "ARMD", "MH")
    item = train[0]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    assert item["label"].shape == (43,) and item["label"].dtype == np.float32
    assert [len(RFMiDDataset(root, s, image_size=32)) for s in ("train", "val", "test")] == [64, 16, 48]
    assert RFMiDDataset(root, "test", image_size=32, drop=()).num_labels == 46


def test_one_index_rule_and_one_image_load(transfer_demo):
    """The three fundus readers share FundusImages: indices 0 .. len - 1 only (a negative one is an IndexError, not
    Python's wrap-around), `describe` is the image file; RFMiD (and the UK Biobank / APTOS reader) circle-crop and
    resize as FundusGenomeDataset always did, PALM resizes only (ContIG's PALM loader)."""
    from medjax.data.readers.fundus_genome import FundusGenomeDataset
    from medjax.data.readers.fundus_images import FundusImages
    from medjax.data.readers.image_io import read_image
    from medjax.data.transforms.image import circle_crop, resize

    rfmid = RFMiDDataset(os.path.join(transfer_demo, "rfmid"), "val", image_size=32)
    palm = PALMDataset(os.path.join(transfer_demo, "palm"), "val", image_size=32)
    for ds in (rfmid, palm):
        assert isinstance(ds, FundusImages) and issubclass(FundusGenomeDataset, FundusImages)
        assert ds.describe(len(ds) - 1) == ds.image_paths[-1]
        for bad in (len(ds), -1):
            with pytest.raises(IndexError, match=rf"{ds.root}: index {bad} out of range for a dataset of {len(ds)}"):
                ds[bad]
            with pytest.raises(IndexError):
                ds.describe(bad)
    np.testing.assert_array_equal(rfmid[1]["image"], resize(circle_crop(read_image(rfmid.image_paths[1])), 32))
    np.testing.assert_array_equal(palm[1]["image"], resize(read_image(palm.image_paths[1]), 32))


def write_rfmid(root, rows, header=("ID", *RFMID_LABELS)):
    folder = os.path.join(root, "Training_Set")  # one folder level is accepted too
    os.makedirs(os.path.join(folder, "Training"))
    with open(os.path.join(folder, "RFMiD_Training_Labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return os.path.join(folder, "RFMiD_Training_Labels.csv")


def test_rfmid_errors_name_file_line_and_field(tmp_path):
    path = write_rfmid(str(tmp_path / "a"), [[1] + [0] * 46, [2] + [0] * 10 + ["2"] + [0] * 35])
    with pytest.raises(DataError, match=rf"{path}: line 3: field 'MS' = '2', expected 0 or 1"):
        RFMiDDataset(str(tmp_path / "a"), "train", image_size=32)
    challenge = ("ID", "Disease_Risk", "DR", "ARMD", "OTHER")  # the 28-disease challenge file has no HR / ODPM
    write_rfmid(str(tmp_path / "b"), [[1, 1, 1, 0, 0]], header=challenge)
    with pytest.raises(DataError, match=r"columns \['HR', 'ODPM'\] to drop \(config data.drop_labels\)"):
        RFMiDDataset(str(tmp_path / "b"), "train", image_size=32)
    assert RFMiDDataset(str(tmp_path / "b"), "train", image_size=32, drop=("Disease_Risk",)).label_names == \
        ("DR", "ARMD", "OTHER")
    with pytest.raises(DataError, match="no RFMiD val labels: expected Evaluation_Set/Evaluation_Set/"):
        RFMiDDataset(str(tmp_path / "b"), "val", image_size=32)


def contig_palm_split(ids, split_seed=42, train_pct=0.6, val_pct=0.2):
    """ContIG's PALM.__init__ split, transcribed with numpy in place of its pandas frame (`df.index` = the row
    numbers, `df.loc[rows].classes` = the classes of those rows; the split reads only their count and classes)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    index, classes = np.arange(len(ids)), np.array([1 * (x[0] == "H") for x in ids])
    sss = StratifiedShuffleSplit(n_splits=1, test_size=1 - train_pct, random_state=split_seed)
    [(train_inds, val_test_inds)] = sss.split(index, classes)
    sss = StratifiedShuffleSplit(n_splits=1, test_size=1 - val_pct / (1 - train_pct), random_state=split_seed + 1)
    [(val_inds, test_inds)] = sss.split(index[val_test_inds], classes[val_test_inds])
    return {"train": train_inds, "val": val_test_inds[val_inds], "test": val_test_inds[test_inds]}


def test_palm_split_is_contigs():
    ids = [f"{c}{k:04d}" for c, n in (("H", 26), ("N", 161), ("P", 213)) for k in range(1, n + 1)]  # PALM-400
    expected = contig_palm_split(ids)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(palm_split(ids, split), expected[split])
    assert sorted(np.concatenate([expected[s] for s in expected])) == list(range(400))


def test_palm_masks_and_layout(transfer_demo, tmp_path):
    root = os.path.join(transfer_demo, "palm")
    sets = {s: PALMDataset(root, s, image_size=32) for s in ("train", "val", "test")}
    assert [len(d) for d in sets.values()] == [18, 6, 6]
    item = sets["train"][0]
    assert item["image"].shape == (32, 32, 3) and item["mask"].shape == (32, 32, 2)
    assert set(np.unique(item["mask"])) <= {0.0, 1.0}
    disc = np.asarray(Image.open(os.path.join(root, "Disc_Masks", f"{sets['train'].ids[0]}.bmp")).convert("L")
                      .resize((32, 32), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(item["mask"][..., 0], (disc == 0).astype(np.float32))  # black = the disc
    normal = [i for i, name in enumerate(sets["train"].ids) if name.startswith("N")]
    assert normal and sets["train"][normal[0]]["mask"][..., 1].sum() == 0  # no atrophy mask: none
    copy = str(tmp_path / "palm")
    shutil.copytree(root, copy)  # the session's demo stays as it is
    os.remove(os.path.join(copy, "Disc_Masks", f"{sets['test'].ids[0]}.bmp"))
    with pytest.raises(DataError, match=f"{sets['test'].ids[0]}.bmp: no optic disc mask"):
        PALMDataset(copy, "test", image_size=32)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(copy, "PALM-Training400", "X0001.jpg"))
    with pytest.raises(DataError, match="do not start with H, N or P"):
        PALMDataset(copy, "train", image_size=32)
