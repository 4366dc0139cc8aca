import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medjax.data import __main__ as cli
from medjax.data.demo.fundus_genome import APTOS_GRADE_FRACTIONS, make_fundus_genome_demo, render_fundus
from medjax.data.readers.fundus_genome import DataError, FundusGenomeDataset
from medjax.data.readers.plink import read_plink

SMALL = {"participants": 20, "image_size": 32, "num_snps": 100}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_fundus_genome_demo(str(tmp_path_factory.mktemp("demo")), seed=0, **SMALL)


def _yellow_pixels(images):
    """Exudate-coloured pixels per image (yellow: high red and green, low blue)."""
    images = images.astype(int)
    return ((images[..., 0] > 190) & (images[..., 1] > 170) & (images[..., 2] < 130)).sum(axis=(1, 2))


def test_pretraining_set_loads(demo):
    assert os.path.isfile(os.path.join(demo, ".complete"))
    ds = FundusGenomeDataset(demo, image_size=32, label_arity=1)
    assert len(ds) == 40 and ds.num_snps == 100
    assert sorted(ds.eyes) == ["left"] * 20 + ["right"] * 20
    np.testing.assert_array_equal(np.bincount(ds.labels), [8, 8, 8, 8, 8])  # every grade equally often
    item = ds[0]
    assert item["image"].shape == (32, 32, 3) and item["genome"].shape == (100,)
    assert set(np.unique(item["genome"])) <= {0.0, 1.0, 2.0}
    sizes = [len(FundusGenomeDataset(demo, image_size=8, split=s, genotypes=None)) for s in ("train", "val", "test")]
    assert sizes == [32, 4, 4]  # 80/10/10 by participant, both eyes together
    plink = read_plink(os.path.join(demo, "genotypes"), snp_stride=10)
    assert len(plink.iids) == 20 and plink.genotypes.shape == (20, 10)


def test_about_one_percent_missing_calls(demo):
    bed = np.fromfile(os.path.join(demo, "genotypes.bed"), np.uint8)[3:].reshape(100, 5)
    codes = (bed[..., None] >> (2 * np.arange(4))) & 3
    missing = (codes == 0b01).mean()
    assert 0.002 < missing < 0.03


def test_genotype_signal(demo):
    truth = json.load(open(os.path.join(demo, "demo_truth.json")))
    plink = read_plink(os.path.join(demo, "genotypes"))
    grades = {row["participant_id"]: int(row["label"]) for row in csv.DictReader(open(os.path.join(demo, "manifest.csv")))}
    y = np.array([grades[iid] for iid in plink.iids])
    causal = [plink.snp_ids.index(s) for s in truth["causal_snp_ids"]]
    assert len(causal) == 5  # 5% of 100
    score = (plink.genotypes[:, causal] * np.array(truth["effect_signs"])).sum(axis=1)
    assert np.corrcoef(score, y)[0, 1] > 0.6


def test_image_signal(demo):
    ds = FundusGenomeDataset(demo, image_size=32, label_arity=1, genotypes=None)
    yellow = _yellow_pixels(np.stack([ds[i]["image"] for i in range(len(ds))]))
    mean = [yellow[ds.labels == g].mean() for g in range(5)]
    assert mean[4] > mean[2] > mean[0] and mean[4] > 5 * mean[0] + 10


def test_optic_disc_is_nasal():
    # The pale optic disc is the bluest structure (background, vessels and lesions have little
    # blue); it sits on the image right for a right eye and on the left for a left eye.
    for grade in range(5):
        for eye in ("left", "right"):
            image = render_fundus(np.random.default_rng(grade), grade, eye, 96)
            assert image.shape == (96, 120, 3) and image[0, 0].tolist() == [0, 0, 0]
            column_of_bluest = np.argmax(image[..., 2].max(axis=0))
            assert (column_of_bluest > 60) == (eye == "right"), (grade, eye, column_of_bluest)


def test_aptos_set(demo):
    root = os.path.join(demo, "aptos")
    assert not os.path.exists(os.path.join(root, "genotypes.bed"))
    ds = FundusGenomeDataset(root, image_size=16, genotypes=None, label_arity=1)
    assert len(ds) == 25
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=5), [12, 3, 7, 1, 2])
    assert np.allclose(np.bincount(ds.labels) / 25, APTOS_GRADE_FRACTIONS, atol=0.05)
    splits = [FundusGenomeDataset(root, image_size=16, genotypes=None, split=s) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [15, 5, 5]


def test_deterministic_and_skips_when_complete(demo, tmp_path):
    again = make_fundus_genome_demo(str(tmp_path / "again"), seed=0, **SMALL)
    for name in ("manifest.csv", "genotypes.bed", "genotypes.bim", "images/1000001_left.png", "aptos/manifest.csv"):
        assert open(os.path.join(again, name), "rb").read() == open(os.path.join(demo, name), "rb").read()
    other = make_fundus_genome_demo(str(tmp_path / "other"), seed=1, **SMALL)
    assert open(os.path.join(other, "genotypes.bed"), "rb").read() != open(os.path.join(demo, "genotypes.bed"), "rb").read()
    # A complete directory is left alone; different arguments rebuild it.
    os.remove(os.path.join(again, "images/1000001_left.png"))
    make_fundus_genome_demo(again, seed=0, **SMALL)
    assert not os.path.exists(os.path.join(again, "images/1000001_left.png"))
    make_fundus_genome_demo(again, seed=0, participants=3, image_size=16, num_snps=8)
    assert len(FundusGenomeDataset(again, image_size=8)) == 6


def _broken_copy(demo, tmp_path):
    root = str(tmp_path / "broken")
    shutil.copytree(demo, root)
    return root


def _edit_manifest_line(root, line, column, value):
    path = os.path.join(root, "manifest.csv")
    rows = list(csv.reader(open(path, newline="")))
    rows[line - 1][rows[0].index(column)] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize("column, value, message", [
    ("eye", "middle", r"line 4: field 'eye' = 'middle'"),
    ("label", "five", r"line 4: field 'label' = 'five' is not an integer"),
    ("image_path", "images/absent.png", r"line 4: field 'image_path': image file .*absent.png not found"),
    ("participant_id", "999", r"have no genotypes in .*genotypes.fam .*\['999'\]"),
])
def test_broken_demo_manifest(demo, tmp_path, column, value, message):
    root = _broken_copy(demo, tmp_path)
    _edit_manifest_line(root, 4, column, value)
    with pytest.raises(DataError, match=message):
        FundusGenomeDataset(root, image_size=8, label_arity=1)


def test_broken_demo_files(demo, tmp_path):
    root = _broken_copy(demo, tmp_path)
    image = os.path.join(root, "images/1000002_right.png")
    open(image, "wb").write(open(image, "rb").read()[:40])  # truncated PNG
    with pytest.raises(DataError, match=r"line 5: field 'image_path': .*1000002_right.png is not a readable image"):
        FundusGenomeDataset(root, image_size=8)
    root = _broken_copy(demo, tmp_path / "2")
    with open(os.path.join(root, "genotypes.bed"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"genotypes.bed: file size 100 bytes, expected 503"):
        FundusGenomeDataset(root, image_size=8)


def test_cli_makes_default_demo(tmp_path, capsys):
    # The default sizes (160 participants at 128 px, 2000 SNPs, ~200 APTOS-like images) in a few seconds.
    out = str(tmp_path / "d")
    assert cli.main(["make-demo", "--kind", "fundus_genome", "--out", out, "--seed", "3"]) == 0
    assert f"fundus_genome demo data in {out}" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, ".complete")))["seed"] == 3
    ds = FundusGenomeDataset(out, image_size=128, snp_stride=100, label_arity=1)
    assert len(ds) == 320 and ds.num_snps == 20 and ds[0]["image"].shape == (128, 128, 3)
    assert len(FundusGenomeDataset(os.path.join(out, "aptos"), image_size=16, genotypes=None)) == 200
    with pytest.raises(SystemExit):
        cli.main(["make-demo", "--kind", "nope", "--out", out])


def test_cli_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "medjax.data", "--help"], capture_output=True, text=True, env=env,
                            check=True)
    assert "make-demo" in result.stdout
    result = subprocess.run([sys.executable, "-m", "medjax.data", "make-demo", "--help"], capture_output=True,
                            text=True, env=env, check=True)
    assert "fundus_genome" in result.stdout
