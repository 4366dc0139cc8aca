"""PLINK 1 binary genotype files (`.bed` + `.bim` + `.fam`): a small pure-numpy reader and writer.

MRM (Yang et al., ICCV 2023) takes its genome modality from the ContIG pipeline (Taleb et al.,
CVPR 2022, `data/data_ukb.py` `get_gen_data`): raw SNPs of UK Biobank chromosomes 1-22 read from one
PLINK file set per chromosome (`ukb_chr{c}_v2`), every 100th SNP kept within each file
(`slice(0, None, 100)`), dosages 0/1/2 as float32, missing calls imputed with the column mode.
`read_plink_chromosomes` reads such a per-chromosome set; `read_plink(..., chromosomes=...)` keeps the
listed chromosomes of a merged file (X / Y / XY / MT, or 23-26, dropped), striding within each.

Format (https://www.cog-genomics.org/plink/1.9/formats#bed):
- `.fam`: one line per sample, 6 whitespace-separated columns: FID IID father mother sex phenotype.
- `.bim`: one line per SNP, 6 columns: chromosome, SNP id, cM position, bp position, allele 1
  (A1), allele 2 (A2).
- `.bed`: magic bytes 0x6c 0x1b, then the mode byte 0x01 (SNP-major; 0x00 would be the obsolete
  individual-major layout, not supported). Then, for each SNP in `.bim` order, ceil(n_samples / 4)
  bytes; each byte holds 4 samples, 2 bits each, the lowest two bits being the first sample.
  The 2-bit codes (as integers) are 0b00 = homozygous A1, 0b01 = missing, 0b10 = heterozygous,
  0b11 = homozygous A2; unused trailing bit pairs are 0.

Checks beyond the format (`read_plink`):
- padding: the bit pairs of samples n..4*ceil(n/4)-1 in the last byte of every SNP must be 0b00 (PLINK
  writes them so, and so does `write_plink`). A `.fam` that lacks a participant the `.bed` holds
  (e.g. one deleted from the middle) still matches the file size whenever n is not a multiple of 4,
  and would shift every later sample's genome by one; the real last sample then sits in the padding
  bits, which are almost never all 0b00 (that needs it homozygous A1 at every SNP). Nonzero padding
  is a `PlinkFormatError` naming the `.bed`, the first bad SNP and the `.fam` count it contradicts.
  (A `.fam` with one participant too many cannot be told from padding; a `.fam` that lost one when n
  is a multiple of 4 changes the expected size and fails the size check.)
- missing calls: a file (after `snp_stride`) whose every call is missing is refused; SNPs whose every
  call is missing are reported in a `PlinkWarning` (count and first ids) and imputed as 0, or dropped
  with `drop_missing_snps=True` (config key `data.drop_missing_snps`); their ids are kept in
  `PlinkGenotypes.missing_snp_ids` either way.

Dosage convention: by default the number of A2 alleles, as ContIG reads them
(`pysnptools.snpreader.Bed(path, count_A1=False)`): 0b00 -> 0, 0b10 -> 1, 0b11 -> 2, 0b01 -> missing.
`count_a1=True` counts A1 alleles instead (bed-reader's default): 0b00 -> 2, 0b10 -> 1, 0b11 -> 0.
`write_plink` takes dosages in the same convention as its `count_a1` (default A2), so it round-trips.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

import numpy as np

from medjax.data.readers.text_io import open_text
from medjax.errors import MedjaxInputError

BED_MAGIC = bytes((0x6C, 0x1B))
SNP_MAJOR = 0x01
MISSING = -1
AUTOSOMES = tuple(str(c) for c in range(1, 23))  # ContIG's chromosomes 1-22
# 2-bit code -> dosage; -1 marks a missing call. A1 counts (count_A1=True) and A2 counts (ContIG's count_A1=False).
_CODE_TO_A1_DOSAGE = np.array([2, MISSING, 1, 0], dtype=np.int8)
_CODE_TO_A2_DOSAGE = np.array([0, MISSING, 1, 2], dtype=np.int8)
# dosage + 1 (so that missing = -1 indexes 0) -> 2-bit code.
_A1_DOSAGE_TO_CODE = np.array([0b01, 0b11, 0b10, 0b00], dtype=np.uint8)
_A2_DOSAGE_TO_CODE = np.array([0b01, 0b00, 0b10, 0b11], dtype=np.uint8)
# byte value -> the 4 dosages it holds, first sample first.
_SHIFTED = (np.arange(256, dtype=np.uint16)[:, None] >> (2 * np.arange(4))) & 0b11
_BYTE_TO_A1_DOSAGES, _BYTE_TO_A2_DOSAGES = _CODE_TO_A1_DOSAGE[_SHIFTED], _CODE_TO_A2_DOSAGE[_SHIFTED]
_DECODE_CHUNK_SNPS = 1024


class PlinkFormatError(MedjaxInputError):
    """A PLINK file is missing or does not follow the format; the message names the file."""


class PlinkWarning(UserWarning):
    """A PLINK file set that reads, but holds something suspect (SNPs with every call missing)."""


@dataclasses.dataclass(frozen=True)
class PlinkGenotypes:
    """Genotypes of `len(iids)` samples at the kept SNPs.

    genotypes: float32 (n_samples, n_kept_snps) dosages in {0, 1, 2} (A2 copies unless read with
    count_a1=True), missing calls imputed.
    missing_snp_ids: the SNPs (among those read) with every call missing; dropped from `snp_ids` and
    `genotypes` when read with `drop_missing_snps=True`, else kept there as dosage 0.
    """

    fids: list[str]
    iids: list[str]
    snp_ids: list[str]
    genotypes: np.ndarray
    missing_snp_ids: list[str] = dataclasses.field(default_factory=list)


def bytes_per_snp(n_samples: int) -> int:
    """ceil(n_samples / 4): the bytes one SNP occupies in a SNP-major `.bed` file."""
    return (n_samples + 3) // 4


def _read_table(path: str, what: str, columns: str) -> list[list[str]]:
    if not os.path.isfile(path):
        raise PlinkFormatError(f"{path}: {what} file not found")
    rows = []
    with open_text(path, f"PLINK {what} file") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise PlinkFormatError(
                    f"{path}: line {line_number}: expected 6 whitespace-separated columns ({columns}), "
                    f"got {len(fields)}: {line.strip()!r}")
            rows.append(fields)
    return rows


def impute_column_mode(dosages: np.ndarray) -> np.ndarray:
    """Replace missing calls (-1) per column with the most frequent observed dosage.

    Ties go to the smallest dosage (as pandas' `Series.mode()[0]`, which ContIG used); a column
    with no observed call is filled with 0. dosages: int (n_samples, n_snps) in {-1, 0, 1, 2}.
    Returns float32 of the same shape.
    """
    counts = np.stack([(dosages == d).sum(axis=0) for d in (0, 1, 2)])  # (3, n_snps)
    mode = np.argmax(counts, axis=0).astype(np.float32)  # argmax: first maximum = smallest dosage
    out = dosages.astype(np.float32)
    return np.where(dosages == MISSING, mode[None, :], out)


def _check_padding(bed: np.memmap, n_samples: int, bed_path: str, fam_path: str, bim: list[list[str]]) -> None:
    """The padding bit pairs (samples >= n_samples) of every SNP's last byte must be 0b00 (module doc)."""
    used = n_samples % 4
    if used == 0 or bed.shape[0] == 0:
        return
    mask = np.uint8((0xFF << (2 * used)) & 0xFF)  # bits of the padding samples in the last byte
    bad, first = 0, None
    for start in range(0, bed.shape[0], 1 << 16):  # one byte per SNP: a strided read of the last column
        last = np.asarray(bed[start:start + (1 << 16), -1])
        hits = np.flatnonzero(last & mask)
        if hits.size and first is None:
            first = (start + int(hits[0]), int(last[hits[0]]))
        bad += hits.size
    if bad:
        j, byte = first
        raise PlinkFormatError(
            f"{bed_path}: {bad} of {bed.shape[0]} SNPs have genotype calls in the padding bits of their last byte "
            f"(first: SNP {j + 1}, {bim[j][1]!r}, last byte 0x{byte:02x}); expected the bit pairs of samples "
            f"{n_samples + 1}..{bed.shape[1] * 4} to be 00 for the {n_samples} samples of {fam_path}. The .bed holds "
            f"more samples than the .fam lists: a participant missing from the .fam would shift every later "
            f"genome by one; restore the .fam written with this .bed")


def normalize_chromosome(code) -> str:
    """A `.bim` chromosome code without a `chr` prefix, upper case ("chr7" -> "7", "x" -> "X")."""
    text = str(code).strip()
    return (text[3:] if text.lower().startswith("chr") else text).upper()


def kept_snps(bim_chromosomes: Sequence[str], snp_stride: int, chromosomes: Sequence | None) -> np.ndarray:
    """Indices of the SNPs read: 0, s, 2s, ... of the file (chromosomes None, ContIG's per-file
    `slice(0, None, s)`), or, per listed chromosome in the listed order, every s-th SNP of that
    chromosome (a merged file read as if it were one file per chromosome)."""
    if chromosomes is None:
        return np.arange(0, len(bim_chromosomes), snp_stride)
    codes = np.array([normalize_chromosome(c) for c in bim_chromosomes])
    parts = [np.flatnonzero(codes == normalize_chromosome(c))[::snp_stride] for c in chromosomes]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def read_plink(prefix: str, *, snp_stride: int = 1, drop_missing_snps: bool = False, count_a1: bool = False,
               chromosomes: Sequence | None = None) -> PlinkGenotypes:
    """Read `prefix.bed/.bim/.fam`, keeping SNPs 0, s, 2s, ... (s = snp_stride); with `chromosomes`
    (e.g. AUTOSOMES) only those chromosomes' SNPs, every s-th within each (`kept_snps`). Dosages count
    A2 alleles (ContIG's `count_A1=False`) unless `count_a1`.

    The `.bed` file is memory-mapped: only the kept SNPs' bytes are decoded (plus the last byte of
    every SNP, whose padding bits are checked). Missing calls are imputed with the column mode of
    the kept SNP (`impute_column_mode`). A read with every call missing is a `PlinkFormatError`;
    kept SNPs with every call missing give a `PlinkWarning` and are dropped with `drop_missing_snps`.
    """
    if snp_stride < 1:
        raise ValueError(f"snp_stride must be >= 1, got {snp_stride}")
    bed_path, bim_path, fam_path = prefix + ".bed", prefix + ".bim", prefix + ".fam"
    fam = _read_table(fam_path, ".fam", "FID IID father mother sex phenotype")
    bim = _read_table(bim_path, ".bim", "chromosome SNP cM bp A1 A2")
    if not os.path.isfile(bed_path):
        raise PlinkFormatError(f"{bed_path}: .bed file not found")
    n_samples, n_snps = len(fam), len(bim)
    with open(bed_path, "rb") as f:
        header = f.read(3)
    if len(header) < 3 or header[:2] != BED_MAGIC:
        raise PlinkFormatError(
            f"{bed_path}: not a PLINK .bed file: expected magic bytes 0x6c 0x1b, got {header[:2].hex(' ') or 'nothing'}")
    if header[2] != SNP_MAJOR:
        kind = "individual-major (mode byte 0x00)" if header[2] == 0 else f"unknown mode byte 0x{header[2]:02x}"
        raise PlinkFormatError(f"{bed_path}: {kind}; only SNP-major .bed files (mode byte 0x01) are supported, "
                               "convert with `plink --bfile PREFIX --make-bed`")
    row_bytes = bytes_per_snp(n_samples)
    expected_size = 3 + n_snps * row_bytes
    actual_size = os.path.getsize(bed_path)
    if actual_size != expected_size:
        raise PlinkFormatError(
            f"{bed_path}: file size {actual_size} bytes, expected {expected_size} = 3 + {n_snps} SNPs ({bim_path}) "
            f"x ceil({n_samples} samples ({fam_path}) / 4)")
    kept = kept_snps([row[0] for row in bim], snp_stride, chromosomes)
    if chromosomes is not None and n_snps and not len(kept):
        found = sorted({normalize_chromosome(row[0]) for row in bim})
        raise PlinkFormatError(f"{bim_path}: no SNP on chromosomes {list(chromosomes)[:5]}...; the file has "
                               f"chromosomes {found[:10]}")
    byte_to_dosages = _BYTE_TO_A1_DOSAGES if count_a1 else _BYTE_TO_A2_DOSAGES
    dosages = np.empty((n_samples, len(kept)), dtype=np.int8)
    if n_snps and n_samples:
        bed = np.memmap(bed_path, dtype=np.uint8, mode="r", offset=3, shape=(n_snps, row_bytes))
        _check_padding(bed, n_samples, bed_path, fam_path, bim)
        for start in range(0, len(kept), _DECODE_CHUNK_SNPS):
            rows = np.asarray(bed[kept[start:start + _DECODE_CHUNK_SNPS]])  # (chunk, row_bytes)
            decoded = byte_to_dosages[rows].reshape(len(rows), row_bytes * 4)[:, :n_samples]
            dosages[:, start:start + len(rows)] = decoded.T
        del bed
    snp_ids = [bim[j][1] for j in kept]
    all_missing = np.flatnonzero((dosages == MISSING).all(axis=0)) if n_samples else np.zeros(0, np.int64)
    missing_ids = [snp_ids[j] for j in all_missing]
    if n_samples and len(kept) and len(all_missing) == len(kept):
        stride = f" (every {snp_stride}th of {n_snps})" if snp_stride > 1 else ""
        raise PlinkFormatError(f"{bed_path}: every genotype call is missing: all {len(kept)} SNPs read{stride} x "
                               f"{n_samples} samples ({fam_path}) have code 01; there is no genotype to train on")
    if len(all_missing):
        if drop_missing_snps:
            observed = np.setdiff1d(np.arange(len(kept)), all_missing)
            dosages, snp_ids = dosages[:, observed], [snp_ids[j] for j in observed]
        else:
            warnings.warn(
                f"{bed_path}: {len(all_missing)} of {len(kept)} SNPs read have every call missing and become "
                f"dosage 0 for all {n_samples} samples, e.g. {missing_ids[:5]} ({bim_path}); set "
                "drop_missing_snps=True (config data.drop_missing_snps) to drop them", PlinkWarning, stacklevel=2)
    return PlinkGenotypes(
        fids=[r[0] for r in fam],
        iids=[r[1] for r in fam],
        snp_ids=snp_ids,
        genotypes=impute_column_mode(dosages),
        missing_snp_ids=missing_ids,
    )


def read_plink_chromosomes(pattern: str, chromosomes: Sequence = AUTOSOMES, *, snp_stride: int = 1,
                           drop_missing_snps: bool = False, count_a1: bool = False) -> PlinkGenotypes:
    """One PLINK file set per chromosome, `pattern` holding `{c}` (ContIG: `ukb_chr{c}_v2`, c = 1..22):
    each read with `read_plink` (every s-th SNP within the file), the SNP columns concatenated in the
    listed chromosome order. Samples are those of the first file, in its order; every other file must
    hold the same IIDs (any order), else a `PlinkFormatError` naming it."""
    if "{c}" not in pattern:
        raise ValueError(f"read_plink_chromosomes: pattern {pattern!r} has no '{{c}}' for the chromosome")
    if not len(chromosomes):
        raise ValueError("read_plink_chromosomes: no chromosomes given")
    first, parts, snp_ids, missing = None, [], [], []
    for c in chromosomes:
        prefix = pattern.format(c=c)
        part = read_plink(prefix, snp_stride=snp_stride, drop_missing_snps=drop_missing_snps, count_a1=count_a1)
        if first is None:
            first, order = part, np.arange(len(part.iids))
        else:
            row_of = {iid: i for i, iid in enumerate(part.iids)}
            absent = [iid for iid in first.iids if iid not in row_of]
            if absent or len(row_of) != len(first.iids):
                raise PlinkFormatError(
                    f"{prefix}.fam: {len(part.iids)} samples do not match the {len(first.iids)} of "
                    f"{pattern.format(c=chromosomes[0])}.fam (e.g. missing {absent[:3]}); every chromosome's "
                    "file set must hold the same participants")
            order = np.array([row_of[iid] for iid in first.iids], np.int64)
        parts.append(part.genotypes[order])
        snp_ids += part.snp_ids
        missing += part.missing_snp_ids
    return PlinkGenotypes(fids=first.fids, iids=first.iids, snp_ids=snp_ids,
                          genotypes=np.concatenate(parts, axis=1), missing_snp_ids=missing)


def _check_names(names: Sequence[str], what: str, count: int) -> list[str]:
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"{what}: expected {count} entries, got {len(names)}")
    for n in names:
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"{what}: {n!r} is empty or contains whitespace, which PLINK text files cannot hold")
    return names


def write_plink(prefix: str, genotypes: np.ndarray, iids: Sequence[str], *, fids: Sequence[str] | None = None,
                snp_ids: Sequence[str] | None = None, chromosomes: Sequence[str | int] | None = None,
                positions: Sequence[int] | None = None,
                alleles: Sequence[tuple[str, str]] | None = None, count_a1: bool = False) -> None:
    """Write `prefix.bed/.bim/.fam` (SNP-major) from dosages (copies of A2, or of A1 with `count_a1`:
    the convention `read_plink` reads them back in).

    genotypes: int (n_samples, n_snps) with values 0/1/2 and -1 for missing.
    Defaults: fids = iids, snp_ids "snp{j}", chromosome 1, positions j + 1, alleles ("A", "G").
    The .fam gets unknown parents/sex (0) and phenotype -9.
    """
    genotypes = np.asarray(genotypes)
    if genotypes.ndim != 2:
        raise ValueError(f"genotypes must be (n_samples, n_snps), got shape {genotypes.shape}")
    if not np.issubdtype(genotypes.dtype, np.integer):
        raise ValueError(f"genotypes must be integer dosages, got dtype {genotypes.dtype}")
    bad = ~np.isin(genotypes, (MISSING, 0, 1, 2))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"genotypes[{i}, {j}] = {genotypes[i, j]}: dosages must be 0, 1, 2 or -1 (missing)")
    n_samples, n_snps = genotypes.shape
    iids = _check_names(iids, "iids", n_samples)
    fids = iids if fids is None else _check_names(fids, "fids", n_samples)
    snp_ids = [f"snp{j}" for j in range(n_snps)] if snp_ids is None else _check_names(snp_ids, "snp_ids", n_snps)
    chromosomes = ["1"] * n_snps if chromosomes is None else _check_names(chromosomes, "chromosomes", n_snps)
    positions = list(range(1, n_snps + 1)) if positions is None else [int(p) for p in positions]
    if len(positions) != n_snps:
        raise ValueError(f"positions: expected {n_snps} entries, got {len(positions)}")
    alleles = [("A", "G")] * n_snps if alleles is None else [tuple(a) for a in alleles]
    if len(alleles) != n_snps or any(len(a) != 2 for a in alleles):
        raise ValueError(f"alleles: expected {n_snps} (A1, A2) pairs")
    a1 = _check_names([a[0] for a in alleles], "alleles (A1)", n_snps)
    a2 = _check_names([a[1] for a in alleles], "alleles (A2)", n_snps)

    row_bytes = bytes_per_snp(n_samples)
    codes = np.zeros((n_snps, row_bytes * 4), dtype=np.uint8)  # padding bit pairs stay 0b00
    to_code = _A1_DOSAGE_TO_CODE if count_a1 else _A2_DOSAGE_TO_CODE
    codes[:, :n_samples] = to_code[genotypes.T.astype(np.int64) + 1]
    codes = codes.reshape(n_snps, row_bytes, 4)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    with open(prefix + ".bed", "wb") as f:
        f.write(BED_MAGIC + bytes((SNP_MAJOR,)))
        f.write(packed.astype(np.uint8).tobytes())
    with open(prefix + ".bim", "w", encoding="utf-8") as f:
        f.writelines(f"{chromosomes[j]}\t{snp_ids[j]}\t0\t{positions[j]}\t{a1[j]}\t{a2[j]}\n" for j in range(n_snps))
    with open(prefix + ".fam", "w", encoding="utf-8") as f:
        f.writelines(f"{fids[i]}\t{iids[i]}\t0\t0\t0\t-9\n" for i in range(n_samples))
