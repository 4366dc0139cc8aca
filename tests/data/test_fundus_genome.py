import csv
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from medjax.data.readers.fundus_genome import DataError, FundusGenomeDataset, participant_split
from medjax.data.transforms.image import circle_crop, resize
from medjax.data.readers.plink import write_plink

COLOURS = {"p0": (200, 80, 30), "p1": (180, 60, 40), "p2": (210, 90, 20), "p3": (190, 70, 50), "p4": (170, 100, 60)}
GENOTYPES = np.array([  # rows follow the .fam order below (p4 first), 5 SNPs
    [2, 2, 2, 2, 2],
    [0, 1, 2, 0, 1],
    [1, 1, -1, 1, 1],
    [2, 0, 2, 0, 2],
    [0, 0, 0, 0, 0],
])
FAM_ORDER = ["p4", "p0", "p1", "p2", "p3"]


def _disk_image(colour, height=24, width=30):
    """A uniform disk of radius 10 on a wider black canvas."""
    image = np.zeros((height, width, 3), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - 12) ** 2 + (xx - 15) ** 2 <= 100] = colour
    return image


def _write_manifest(root, header, rows):
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def _make_root(tmp_path, *, split_column=True, labels=("0", "1", "2", "3", "4")):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    splits = ["train", "train", "val", "test", "train"]
    for k, pid in enumerate(COLOURS):
        for eye in ("left", "right"):
            rel = f"img/{pid}_{eye}.png"
            Image.fromarray(_disk_image(COLOURS[pid])).save(os.path.join(root, rel))
            rows.append([pid, eye, rel, labels[k]] + ([splits[k]] if split_column else []))
    _write_manifest(root, ["participant_id", "eye", "image_path", "label"] + (["split"] if split_column else []), rows)
    write_plink(os.path.join(root, "genotypes"), GENOTYPES, FAM_ORDER)
    return root


def test_items_with_genome_and_label(tmp_path):
    ds = FundusGenomeDataset(_make_root(tmp_path), image_size=8, label_arity=1)
    assert len(ds) == 10 and ds.num_snps == 5
    item = ds[3]  # p1, right eye
    assert set(item) == {"image", "genome", "label", "index"} and item["index"] == 3
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
    # circle crop removes the black side bands (21 x 21 square), then the 8 x 8 bilinear resize:
    # the centre is the disk colour, the corners nearly black.
    np.testing.assert_array_equal(item["image"], resize(circle_crop(_disk_image(COLOURS["p1"])), 8))
    assert item["image"][4, 4].tolist() == list(COLOURS["p1"])
    assert item["image"][0, 0].max() <= 2
    assert item["genome"].dtype == np.float32
    np.testing.assert_array_equal(item["genome"], [1, 1, 2, 1, 1])  # missing call -> column mode 2
    assert item["label"].dtype == np.int32 and int(item["label"]) == 1
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(ds[8]["genome"], GENOTYPES[0])  # p4
    for bad in (10, -1):  # the fundus readers' index rule: 0 .. len - 1 (medjax.data.readers.fundus_images)
        with pytest.raises(IndexError, match=rf"index {bad} out of range for a dataset of 10 items"):
            ds[bad]


def test_snp_stride_and_image_only(tmp_path):
    root = _make_root(tmp_path)
    ds = FundusGenomeDataset(root, image_size=8, snp_stride=2)
    assert ds.num_snps == 3 and ds.snp_ids == ["snp0", "snp2", "snp4"]
    np.testing.assert_array_equal(ds[0]["genome"], GENOTYPES[1, ::2])
    assert "label" not in ds[0]
    with pytest.raises(AttributeError, match="label_arity"):
        ds.labels
    image_only = FundusGenomeDataset(root, image_size=8, genotypes=None)
    assert image_only.num_snps == 0 and set(image_only[0]) == {"image", "index"}


def test_multi_hot_labels(tmp_path):
    root = _make_root(tmp_path, labels=("1;0;0", "0;1;1", "0;0;0", "1;1;1", "0;0;1"))
    ds = FundusGenomeDataset(root, image_size=8, label_arity=3, genotypes=None)
    assert ds[2]["label"].dtype == np.float32
    np.testing.assert_array_equal(ds[2]["label"], [0, 1, 1])
    assert ds.labels.shape == (10, 3) and ds.labels.sum() == 2 * 7


def test_split_column(tmp_path):
    ds = FundusGenomeDataset(_make_root(tmp_path), image_size=8, split="train")
    assert ds.participant_ids == ["p0", "p0", "p1", "p1", "p4", "p4"]
    np.testing.assert_array_equal(ds[4]["genome"], GENOTYPES[0])  # p4 after compacting the genotype rows


def test_participant_split_without_column(tmp_path):
    # np.random.RandomState(42).permutation(5) = [1, 4, 2, 0, 3]: train = participants 1, 4, 2;
    # val = 0; test = 3 (ContIG's APTOS protocol, by participant).
    assert participant_split(["a", "b", "c", "d", "e"], "train") == {"b", "e", "c"}
    assert participant_split(["a", "b", "a", "c", "d", "e"], "val") == {"a"}
    assert participant_split(["a", "b", "c", "d", "e"], "test") == {"d"}
    root = _make_root(tmp_path, split_column=False)
    parts = {s: FundusGenomeDataset(root, image_size=8, split=s, genotypes=None) for s in ("train", "val", "test")}
    assert parts["train"].participant_ids == ["p1", "p1", "p2", "p2", "p4", "p4"]  # both eyes together
    assert parts["val"].participant_ids == ["p0", "p0"] and parts["test"].participant_ids == ["p3", "p3"]


def test_participant_split_of_sorted_ids_as_contig():
    # ContIG's UK Biobank split permutes the sorted unique ids: sorted = [a, b, c, d, e] whatever the row order
    rows = ["e", "c", "a", "d", "b", "e"]
    assert participant_split(rows, "train", order="sorted") == {"b", "e", "c"}
    assert participant_split(rows, "train") == {"c", "b", "a"}  # appearance order [e, c, a, d, b]


def test_manifest_without_eye_column_loads(tmp_path):
    """APTOS manifests have no eye column (ContIG's loader needs none)."""
    root = _make_root(tmp_path)
    _rewrite_manifest(root, lambda rows: [r.pop(1) for r in rows])
    ds = FundusGenomeDataset(root, image_size=8, label_arity=1, genotypes=None)
    assert len(ds) == 10 and ds.eyes == [""] * 10 and int(ds.labels[3]) == 1


def test_per_chromosome_genotypes_and_autosome_filter(tmp_path):
    root = _make_root(tmp_path)
    iids = FAM_ORDER
    merged = np.asarray(GENOTYPES)
    n_snps = merged.shape[1]
    half = n_snps // 2
    for c, cols in ((1, slice(0, half)), (2, slice(half, None))):
        write_plink(os.path.join(root, f"ukb_chr{c}_v2"), merged[:, cols], iids, chromosomes=[c] * len(range(n_snps)[cols]))
    ds = FundusGenomeDataset(root, image_size=8, genotypes="ukb_chr{c}_v2", chromosomes=("1", "2"), snp_stride=2)
    whole = FundusGenomeDataset(root, image_size=8, snp_stride=1)
    expected = np.concatenate([whole[3]["genome"][:half][::2], whole[3]["genome"][half:][::2]])
    np.testing.assert_array_equal(ds[3]["genome"], expected)


def test_pickles(tmp_path):
    ds = FundusGenomeDataset(_make_root(tmp_path), image_size=8, label_arity=1)
    clone = pickle.loads(pickle.dumps(ds))
    for key, value in ds[5].items():
        np.testing.assert_array_equal(clone[5][key], value)


def _rewrite_manifest(root, edit):
    path = os.path.join(root, "manifest.csv")
    rows = list(csv.reader(open(path, newline="")))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _set(line, col, value):
    def edit(rows):  # rows[0] is the header, line 1
        rows[line - 1][rows[0].index(col)] = value
    return edit


@pytest.mark.parametrize("edit, kwargs, message", [
    (lambda rows: [r.pop(2) for r in rows], {}, r"manifest.csv: line 1: .* lacks required column\(s\) \['image_path'\]"),
    (lambda rows: [r.pop(3) for r in rows], {"label_arity": 1}, r"line 1: label_arity=1 needs a 'label' column"),
    (_set(3, "eye", "both"), {}, r"manifest.csv: line 3: field 'eye' = 'both'"),
    (_set(2, "split", "holdout"), {}, r"line 2: field 'split' = 'holdout'"),
    (_set(4, "image_path", "img/nope.png"), {}, r"line 4: field 'image_path': image file .*img/nope.png not found"),
    (_set(5, "label", "2.5"), {"label_arity": 1}, r"line 5: field 'label' = '2.5' is not an integer"),
    (_set(5, "label", "-1"), {"label_arity": 1}, r"line 5: field 'label' = '-1' must be a class index"),
    (_set(6, "label", "1;0"), {"label_arity": 3}, r"line 6: field 'label' = '1;0' has 2 entries, expected 3"),
    (_set(2, "participant_id", ""), {}, r"line 2: field 'participant_id' is empty"),
    (_set(7, "participant_id", "p9"), {}, r"field 'participant_id': 1 participant\(s\) have no genotypes in .*genotypes.fam .*\['p9'\]"),
    (lambda rows: rows[3].append("x"), {}, r"line 4: expected 5 fields"),
])
def test_bad_manifest(tmp_path, edit, kwargs, message):
    labels = ("1;0;0", "0;1;1", "0;0;0", "1;1;1", "0;0;1") if kwargs.get("label_arity") == 3 else ("0", "1", "2", "3", "4")
    root = _make_root(tmp_path, labels=labels)
    _rewrite_manifest(root, edit)
    with pytest.raises(DataError, match=message):
        FundusGenomeDataset(root, image_size=8, **kwargs)


def test_rows_outside_the_split_are_validated_too(tmp_path):
    root = _make_root(tmp_path)
    _rewrite_manifest(root, _set(9, "label", "x"))  # p3, split test
    with pytest.raises(DataError, match=r"line 9: field 'label' = 'x'"):
        FundusGenomeDataset(root, image_size=8, label_arity=1, split="train")
    root = _make_root(tmp_path / "b")
    _rewrite_manifest(root, _set(9, "participant_id", "p7"))
    with pytest.raises(DataError, match=r"no genotypes .*\['p7'\]"):
        FundusGenomeDataset(root, image_size=8, split="train")


def test_unreadable_image(tmp_path):
    root = _make_root(tmp_path)
    open(os.path.join(root, "img/p2_left.png"), "wb").write(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"line 6: field 'image_path': .*p2_left.png is not a readable image"):
        FundusGenomeDataset(root, image_size=8)


def test_missing_files_and_empty_split(tmp_path):
    root = _make_root(tmp_path)
    with pytest.raises(DataError, match=r"other.csv: manifest not found"):
        FundusGenomeDataset(root, image_size=8, manifest="other.csv")
    os.remove(os.path.join(root, "genotypes.bim"))
    with pytest.raises(DataError, match=r"genotypes.bim: .bim file not found"):
        FundusGenomeDataset(root, image_size=8)
    _rewrite_manifest(root, lambda rows: [r.__setitem__(4, "train") for r in rows[1:]])
    with pytest.raises(DataError, match=r"manifest.csv: no rows in split 'test'"):
        FundusGenomeDataset(root, image_size=8, split="test", genotypes=None)
