import os

import numpy as np
import pytest

from medjax.data.readers.plink import (AUTOSOMES, PlinkFormatError, PlinkWarning, impute_column_mode, read_plink,
                                       read_plink_chromosomes, write_plink)


def _write(tmp_path, genotypes, **kwargs):
    prefix = str(tmp_path / "g")
    iids = [f"id{i}" for i in range(len(genotypes))]
    write_plink(prefix, np.asarray(genotypes), iids, **kwargs)
    return prefix


def test_hand_checked_bytes(tmp_path):
    # A1 dosages 2, 1, 0, missing -> codes 0b00, 0b10, 0b11, 0b01, first sample in the lowest bits.
    prefix = _write(tmp_path, [[2], [1], [0], [-1]], count_a1=True)
    assert open(prefix + ".bed", "rb").read() == bytes((0x6C, 0x1B, 0x01, 0b01_11_10_00))
    # A2 dosages (the default, ContIG's count_A1=False) 2, 1, 0, missing -> 0b11, 0b10, 0b00, 0b01
    prefix = _write(tmp_path, [[2], [1], [0], [-1]])
    assert open(prefix + ".bed", "rb").read() == bytes((0x6C, 0x1B, 0x01, 0b01_00_10_11))
    # 5 samples -> 2 bytes per SNP; the padding bit pairs of the second byte are 0.
    prefix = _write(tmp_path, [[0, 2], [0, 2], [0, 2], [0, 2], [1, -1]], count_a1=True)
    assert open(prefix + ".bed", "rb").read() == bytes((0x6C, 0x1B, 0x01, 0xFF, 0b10, 0x00, 0b01))


def test_reads_bed_reader_small_example(tmp_path):
    # bed-reader's test file small.bed (3 samples, 4 SNPs); bed-reader (count_A1=True) reads it as
    # [[1, 0, nan, 0], [2, 0, nan, 2], [0, 1, 2, 0]]; the nan column is imputed with its mode, 2.
    prefix = str(tmp_path / "small")
    open(prefix + ".bed", "wb").write(bytes.fromhex("6c1b01322f0533"))
    open(prefix + ".bim", "w").write("1\tsid1\t100.4\t1\tA\tA\n1\tsid2\t2000.5\t100\tT\tC\n"
                                     "5\tsid3\t4000.7\t1000\tA\tC\nY\tsid4\t7000.9\t1004\tT\tG\n")
    open(prefix + ".fam", "w").write("fid1 iid1 iid23 iid34 1 red\nfid1 iid2 iid23 iid34 2 red\n"
                                     "fid2 iid3 iid22 iid33 0 blue\n")
    got = read_plink(prefix, count_a1=True)
    assert got.fids == ["fid1", "fid1", "fid2"] and got.iids == ["iid1", "iid2", "iid3"]
    assert got.snp_ids == ["sid1", "sid2", "sid3", "sid4"]
    np.testing.assert_array_equal(got.genotypes, [[1, 0, 2, 0], [2, 0, 2, 2], [0, 1, 2, 0]])
    # ContIG's pysnptools Bed(count_A1=False): A2 copies = 2 - A1 copies, [[1, 2, nan, 2], [0, 2, nan, 0],
    # [2, 1, 0, 2]]; the nan column's mode is now 0
    np.testing.assert_array_equal(read_plink(prefix).genotypes, [[1, 2, 0, 2], [0, 2, 0, 0], [2, 1, 0, 2]])


def test_per_chromosome_files_stride_within_each_file(tmp_path):
    """ContIG: one file set per chromosome, `slice(0, None, 100)` per file (here a stride of 3), columns in
    chromosome order; a second file with the samples in another order is aligned by IID."""
    rng = np.random.default_rng(1)
    sizes = {1: 7, 2: 5, 3: 4}
    genomes = {c: rng.integers(0, 3, (6, n)) for c, n in sizes.items()}
    iids = [f"id{i}" for i in range(6)]
    for c, g in genomes.items():
        order = np.arange(6) if c != 2 else np.arange(6)[::-1]
        write_plink(str(tmp_path / f"ukb_chr{c}_v2"), g[order], [iids[i] for i in order],
                    snp_ids=[f"c{c}s{j}" for j in range(sizes[c])], chromosomes=[c] * sizes[c])
    got = read_plink_chromosomes(str(tmp_path / "ukb_chr{c}_v2"), (1, 2, 3), snp_stride=3)
    expected = np.concatenate([genomes[c][:, slice(0, None, 3)] for c in (1, 2, 3)], axis=1)
    np.testing.assert_array_equal(got.genotypes, expected)
    assert got.iids == iids and got.snp_ids == ["c1s0", "c1s3", "c1s6", "c2s0", "c2s3", "c3s0", "c3s3"]
    with pytest.raises(PlinkFormatError, match=r"ukb_chr4_v2\.fam: .* not found"):
        read_plink_chromosomes(str(tmp_path / "ukb_chr{c}_v2"), (1, 4))


def test_merged_file_keeps_autosomes_with_a_stride_per_chromosome(tmp_path):
    chromosomes = ["1"] * 5 + ["chr2"] * 4 + ["X"] * 3 + ["23"] + ["MT"] * 2
    genotypes = np.random.default_rng(2).integers(0, 3, (4, len(chromosomes)))
    prefix = _write(tmp_path, genotypes, chromosomes=chromosomes)
    got = read_plink(prefix, snp_stride=2, chromosomes=AUTOSOMES)
    np.testing.assert_array_equal(got.genotypes, genotypes[:, [0, 2, 4, 5, 7]])  # chr 1: 0 2 4; chr 2: 5 7
    with pytest.raises(PlinkFormatError, match=r"no SNP on chromosomes \['5'\]"):
        read_plink(prefix, chromosomes=["5"])


def test_text_files(tmp_path):
    prefix = _write(tmp_path, [[0, 1], [2, 2]], snp_ids=["rs1", "rs2"], chromosomes=[3, 4],
                    positions=[100, 200], alleles=[("A", "C"), ("G", "T")], fids=["f0", "f1"])
    assert open(prefix + ".bim").read().splitlines() == ["3\trs1\t0\t100\tA\tC", "4\trs2\t0\t200\tG\tT"]
    assert open(prefix + ".fam").read().splitlines() == ["f0\tid0\t0\t0\t0\t-9", "f1\tid1\t0\t0\t0\t-9"]


def test_round_trip_and_stride(tmp_path):
    rng = np.random.default_rng(0)
    genotypes = rng.integers(0, 3, (7, 11))
    prefix = _write(tmp_path, genotypes)
    full = read_plink(prefix)
    assert full.iids == [f"id{i}" for i in range(7)] and full.fids == full.iids
    assert full.snp_ids == [f"snp{j}" for j in range(11)]
    assert full.genotypes.dtype == np.float32
    np.testing.assert_array_equal(full.genotypes, genotypes)
    strided = read_plink(prefix, snp_stride=4)
    assert strided.snp_ids == ["snp0", "snp4", "snp8"]
    np.testing.assert_array_equal(strided.genotypes, genotypes[:, ::4])


def test_mode_imputation(tmp_path):
    genotypes = np.array([
        [-1, 0, -1, -1],
        [1, 0, -1, 2],
        [1, -1, -1, 0],
        [2, 2, -1, -1],
    ])
    with pytest.warns(PlinkWarning, match="1 of 4 SNPs read have every call missing"):
        got = read_plink(_write(tmp_path, genotypes)).genotypes
    # column 0: mode 1; column 1: mode 0; column 2: all missing -> 0; column 3: tie 0/2 -> 0.
    np.testing.assert_array_equal(got, [[1, 0, 0, 0], [1, 0, 0, 2], [1, 0, 0, 0], [2, 2, 0, 0]])
    np.testing.assert_array_equal(impute_column_mode(np.array([[-1], [2], [2], [1]])), [[2], [2], [2], [1]])


def test_write_rejects_bad_dosage(tmp_path):
    with pytest.raises(ValueError, match=r"genotypes\[1, 0\] = 3"):
        _write(tmp_path, [[0], [3]])
    with pytest.raises(ValueError, match="whitespace"):
        write_plink(str(tmp_path / "g"), np.zeros((1, 1), int), ["a b"])


@pytest.mark.parametrize("ext", [".bed", ".bim", ".fam"])
def test_missing_file(tmp_path, ext):
    prefix = _write(tmp_path, [[0]])
    os.remove(prefix + ext)
    with pytest.raises(PlinkFormatError, match=rf"g\{ext}: .* not found"):
        read_plink(prefix)


def test_bad_magic_and_mode(tmp_path):
    prefix = _write(tmp_path, [[0], [1], [2], [0]])
    data = open(prefix + ".bed", "rb").read()
    open(prefix + ".bed", "wb").write(b"\x00\x00" + data[2:])
    with pytest.raises(PlinkFormatError, match=r"g\.bed: not a PLINK .bed file.*00 00"):
        read_plink(prefix)
    open(prefix + ".bed", "wb").write(data[:2] + b"\x00" + data[3:])
    with pytest.raises(PlinkFormatError, match=r"g\.bed: individual-major"):
        read_plink(prefix)


def test_bad_size(tmp_path):
    prefix = _write(tmp_path, np.zeros((5, 3), int))
    with open(prefix + ".bed", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(PlinkFormatError, match=r"file size 10 bytes, expected 9 = 3 \+ 3 SNPs .* ceil\(5 samples"):
        read_plink(prefix)


def test_malformed_text_lines(tmp_path):
    prefix = _write(tmp_path, np.zeros((2, 2), int))
    with open(prefix + ".bim", "a") as f:
        f.write("1 rs9 0 5 A\n")
    with pytest.raises(PlinkFormatError, match=r"g\.bim: line 3: expected 6 .* got 5"):
        read_plink(prefix)
    prefix = _write(tmp_path, np.zeros((2, 2), int))
    open(prefix + ".fam", "w").write("f0 id0 0 0 0 -9\nf1 id1 0 0 0 -9 extra\n")
    with pytest.raises(PlinkFormatError, match=r"g\.fam: line 2: expected 6 .* got 7"):
        read_plink(prefix)
