"""Issue #15 (reliability), items 2 and 3: PLINK padding / .fam count, and all-missing SNPs.

PLINK codes (SNP-major .bed, first sample in the lowest bit pair): 00 hom A1, 01 missing, 10 het,
11 hom A2; the bit pairs past the last sample are 00 (what plink and medjax's writer write)."""
import csv
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from medjax.data.errors import DataError
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.readers.plink import PlinkFormatError, PlinkWarning, read_plink, write_plink


def _write(tmp_path, genotypes, name="g"):
    prefix = str(tmp_path / name)
    write_plink(prefix, np.asarray(genotypes), [f"id{i}" for i in range(len(genotypes))], count_a1=True)  # A1 dosages
    return prefix


def _drop_fam_line(prefix, index):
    lines = open(prefix + ".fam").read().splitlines(keepends=True)
    del lines[index]
    open(prefix + ".fam", "w").write("".join(lines))


def test_writer_pads_with_zero_bits_and_reader_accepts_it(tmp_path):
    prefix = _write(tmp_path, np.zeros((6, 3), int))  # 0 = hom A2 = 0b11 in every used pair
    data = open(prefix + ".bed", "rb").read()[3:]
    assert data == bytes((0xFF, 0x0F)) * 3  # samples 6 and 7 of each last byte: 00
    assert read_plink(prefix).genotypes.shape == (6, 3)


def test_fam_missing_a_middle_participant_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    genotypes = rng.integers(0, 2, (7, 40))  # dosages 0/1: the last sample is never hom A1 (00)
    prefix = _write(tmp_path, genotypes)
    _drop_fam_line(prefix, 3)  # 6 samples: still ceil(6 / 4) = 2 bytes per SNP, the size matches
    assert os.path.getsize(prefix + ".bed") == 3 + 40 * 2
    with pytest.raises(PlinkFormatError, match=r"g\.bed: 40 of 40 SNPs have genotype calls in the padding bits .*"
                                              r"SNP 1, 'snp0'.* samples 7\.\.8 to be 00 for the 6 samples of .*g\.fam"):
        read_plink(prefix)
    with pytest.raises(PlinkFormatError, match="padding bits"):  # the stride does not skip the check
        read_plink(prefix, snp_stride=10)


def test_one_bad_padding_byte_is_found(tmp_path):
    prefix = _write(tmp_path, np.full((5, 4), 2))
    data = bytearray(open(prefix + ".bed", "rb").read())
    data[3 + 2 * 2 + 1] |= 0b0100  # SNP 3's last byte, the bit pair of (absent) sample 6
    open(prefix + ".bed", "wb").write(bytes(data))
    with pytest.raises(PlinkFormatError, match=r"1 of 4 SNPs .*SNP 3, 'snp2', last byte 0x04"):
        read_plink(prefix)


def test_whole_bed_of_missing_calls_is_refused(tmp_path):
    prefix = _write(tmp_path, np.full((5, 3), -1))
    with pytest.raises(PlinkFormatError, match=r"g\.bed: every genotype call is missing: all 3 SNPs read x 5 samples"):
        read_plink(prefix)
    # only the SNPs read count: every 2nd of 4, and those two are all missing
    genotypes = np.full((5, 4), -1)
    genotypes[:, 1] = 1
    prefix = _write(tmp_path, genotypes, "h")
    with pytest.raises(PlinkFormatError, match=r"h\.bed: every genotype call is missing: all 2 SNPs read \(every 2th"):
        read_plink(prefix, snp_stride=2)


def test_all_missing_snps_warn_or_drop(tmp_path):
    genotypes = np.array([[2, -1, 0, -1], [1, -1, 0, -1], [0, -1, -1, -1]])
    prefix = _write(tmp_path, genotypes)
    with pytest.warns(PlinkWarning, match=r"g\.bed: 2 of 4 SNPs read have every call missing .*\['snp1', 'snp3'\]"):
        kept = read_plink(prefix, count_a1=True)
    assert kept.snp_ids == ["snp0", "snp1", "snp2", "snp3"] and kept.missing_snp_ids == ["snp1", "snp3"]
    np.testing.assert_array_equal(kept.genotypes[:, 1], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = read_plink(prefix, drop_missing_snps=True, count_a1=True)
    assert dropped.snp_ids == ["snp0", "snp2"] and dropped.missing_snp_ids == ["snp1", "snp3"]
    np.testing.assert_array_equal(dropped.genotypes, [[2, 0], [1, 0], [0, 0]])


def _fundus_root(tmp_path, genotypes):
    os.makedirs(tmp_path / "img")
    rows = [["participant_id", "eye", "image_path"]]
    for i in range(len(genotypes)):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append([f"id{i}", "left", f"img/{i}.png"])
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return _write(tmp_path, genotypes, "genotypes")


def test_fundus_dataset_refuses_shifted_fam_and_drops_missing_snps(tmp_path):
    genotypes = np.array([[0, -1, 1], [1, -1, 1], [0, -1, 0], [1, -1, 1], [0, -1, 1], [1, -1, 0]])
    prefix = _fundus_root(tmp_path, genotypes)
    with pytest.warns(PlinkWarning, match="snp1"):
        ds = FundusGenomeDataset(str(tmp_path), image_size=8)
    assert ds.num_snps == 3
    ds = FundusGenomeDataset(str(tmp_path), image_size=8, drop_missing_snps=True)
    assert ds.num_snps == 2 and ds.snp_ids == ["snp0", "snp2"]
    np.testing.assert_array_equal(ds[3]["genome"], [1, 1])
    _drop_fam_line(prefix, 2)
    lines = open(tmp_path / "manifest.csv").read().splitlines()
    open(tmp_path / "manifest.csv", "w").write("\n".join(lines[:3] + lines[4:]) + "\n")  # id2 gone there too; 5 samples: ceil(5 / 4) = 2 bytes still
    with pytest.raises(DataError, match=r"genotypes\.bed: .*padding bits"):
        FundusGenomeDataset(str(tmp_path), image_size=8, drop_missing_snps=True)
