"""Paired colour-fundus + genotype dataset (MRM, Yang et al., ICCV 2023, Sec. 4.1; the ContIG
UK Biobank pipeline), also used image-only for downstream sets such as APTOS 2019.

Directory layout (bring real data in this form):

    <root>/manifest.csv          header row, then one row per image
    <root>/<image files>         any format PIL reads (PNG, JPEG, ...), paths relative to <root>
    <root>/genotypes.bed/.bim/.fam   PLINK 1 binary genotypes (optional: image-only sets have none);
                                     or one file set per chromosome, `genotypes="ukb_chr{c}_v2"`
                                     (ContIG's layout, chromosomes 1-22 by default)

manifest.csv columns:
    participant_id  required; matches the IID (column 2) of genotypes.fam
    eye             optional; `left` or `right` (each eye is its own sample, as in ContIG); APTOS
                    manifests have none
    image_path      required; relative to <root>
    label           optional; an integer class (`3`), or a `;`-separated multi-hot vector
                    (`0;1;0;0;1`) for multi-label sets such as RFMiD
    split           optional; `train`, `val` or `test`

Without a split column a requested split is drawn per participant, 60/20/20 train/val/test,
from `np.random.RandomState(42).permutation` over the participants in order of first appearance
(`split_order="appearance"`, the authors' APTOS protocol) or over the sorted unique ids
(`split_order="sorted"`, ContIG's UK Biobank split), so both eyes of a participant fall in the same split.

Duplicates are an error naming both lines: a row repeated exactly, a participant_id + eye given
twice, or an image_path used twice (one photograph would count as two samples, or one eye would be
weighted twice). With `allow_duplicates=True` (config key `data.allow_duplicates`) they are kept and
a `DataWarning` gives their count.

Everything is validated in the constructor (`DataError`, naming file, line and field), so a bad
file fails before training starts. `__getitem__` holds no open file handles (Grain workers pickle
the dataset).
"""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np
from PIL import Image

from medjax.data.errors import DataError, DataWarning
from medjax.data.readers.fundus_images import FundusImages
from medjax.data.readers.plink import AUTOSOMES, PlinkFormatError, read_plink, read_plink_chromosomes
from medjax.data.readers.text_io import open_text

REQUIRED_COLUMNS = ("participant_id", "image_path")
SPLIT_ORDERS = ("appearance", "sorted")
EYES = ("left", "right")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 42
SPLIT_FRACTIONS = (0.6, 0.2)  # train, val; the rest is test


def participant_split(participant_ids: list[str], split: str, *, seed: int = SPLIT_SEED,
                      order: str = "appearance") -> set[str]:
    """The participants of `split` in a 60/20/20 train/val/test split by participant.

    The unique participants, in order of first appearance (`order="appearance"`) or sorted
    (`order="sorted"`: ContIG's `np.random.permutation` of the sorted unique ids), are permuted by
    `np.random.RandomState(seed)`; the first int(0.6 N) are train, the next up to int(0.8 N) val.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if order not in SPLIT_ORDERS:
        raise ValueError(f"split order must be one of {SPLIT_ORDERS}, got {order!r}")
    unique = list(dict.fromkeys(participant_ids)) if order == "appearance" else sorted(set(participant_ids))
    n = len(unique)
    perm = np.random.RandomState(seed).permutation(n)
    n_train, n_trainval = int(n * SPLIT_FRACTIONS[0]), int(n * sum(SPLIT_FRACTIONS))
    chosen = {"train": perm[:n_train], "val": perm[n_train:n_trainval], "test": perm[n_trainval:]}[split]
    return {unique[i] for i in chosen}


def _parse_label(text: str, arity: int, where: str, num_classes: int | None = None) -> np.ndarray:
    parts = text.split(";") if arity > 1 else [text]
    if len(parts) != arity:
        raise DataError(f"{where}: field 'label' = {text!r} has {len(parts)} entries, expected {arity} "
                        "(a ';'-separated multi-hot vector)")
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        raise DataError(f"{where}: field 'label' = {text!r} is not {'an integer' if arity == 1 else 'integers'}") from None
    if arity == 1 and values[0] < 0:
        raise DataError(f"{where}: field 'label' = {text!r} must be a class index >= 0")
    if arity == 1 and num_classes is not None and values[0] >= num_classes:
        raise DataError(f"{where}: field 'label' = {text!r}: expected a class index in [0, {num_classes}) "
                        f"(model.num_classes={num_classes})")
    if arity > 1 and any(v not in (0, 1) for v in values):
        raise DataError(f"{where}: field 'label' = {text!r}: multi-hot entries must be 0 or 1")
    return np.asarray(values[0], np.int32) if arity == 1 else np.asarray(values, np.float32)


def _check_image(path: str, where: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'image_path': image file {path} not found")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{where}: field 'image_path': {path} is not a readable image ({type(e).__name__}: {e})") from e


def _check_duplicates(rows: list[tuple[int, dict[str, str]]], path: str, allow: bool) -> None:
    """Repeated rows, participant_id + eye pairs or image paths: DataError naming the lines, or with
    `allow` a DataWarning with the count."""
    found = []  # (line, description)
    seen_row, seen_eye, seen_image = {}, {}, {}
    for line, row in rows:
        whole = tuple(sorted(row.items()))
        if whole in seen_row:
            found.append((line, f"repeats line {seen_row[whole]} exactly"))
        elif "eye" in row and (row["participant_id"], row["eye"]) in seen_eye:
            found.append((line, f"participant_id {row['participant_id']!r} + eye {row['eye']!r} repeats line "
                                f"{seen_eye[row['participant_id'], row['eye']]}"))
        elif row["image_path"] in seen_image:
            found.append((line, f"image_path {row['image_path']!r} repeats line {seen_image[row['image_path']]}"))
        seen_row.setdefault(whole, line)
        seen_eye.setdefault((row["participant_id"], row.get("eye", "")), line)
        seen_image.setdefault(row["image_path"], line)
    if not found:
        return
    line, what = found[0]
    summary = f"{len(found)} duplicate row(s) of {len(rows)}, first: line {line}: {what}"
    if not allow:
        raise DataError(f"{path}: line {line}: {what} ({len(found)} duplicate row(s) in all); remove them, or set "
                        "allow_duplicates=True (config data.allow_duplicates) to keep them")
    warnings.warn(f"{path}: {summary}; kept (allow_duplicates=True)", DataWarning, stacklevel=3)


class FundusGenomeDataset(FundusImages):
    """Random-access fundus (+ genotype, + label) samples from a directory in the layout above.

    Items: {"image": uint8 (image_size, image_size, 3) after circle crop + resize,
            "genome": float32 (num_snps,) [if genotypes], "label": int32 () or float32 (arity,)
            [if label_arity], "index": int}.
    genotypes: PLINK prefix relative to root (None = image only); with `{c}` one file set per
    chromosome (`chromosomes`, default 1-22); snp_stride keeps every s-th SNP within each file.
    chromosomes: the chromosomes read (a merged file: only their SNPs, X/Y/MT dropped when AUTOSOMES);
    None = every SNP of a single file. count_a1: dosages count A1 (default A2, ContIG's count_A1=False).
    split_order: "appearance" or "sorted" (`participant_split`).
    label_arity: None = labels unused, 1 = integer class, n > 1 = multi-hot of n entries.
    drop_missing_snps: drop SNPs whose every call is missing (else they stay as dosage 0, with a
    `PlinkWarning`); config key `data.drop_missing_snps`.
    allow_duplicates: keep duplicate manifest rows (module docstring) with a warning instead of
    failing; config key `data.allow_duplicates`.
    check_images: open every image (PIL verify) while reading the manifest; tasks pass False and run
    the start-up check instead (`medjax.data.verify`, decoding every image, in parallel) over
    `image_paths` / `image_wheres` (the manifest line of each).
    Indices 0 .. len - 1 only (`medjax.data.readers.fundus_images`: the fundus readers' index rule).
    """

    def __init__(self, root: str, *, image_size: int, snp_stride: int = 1, genotypes: str | None = "genotypes",
                 manifest: str = "manifest.csv", label_arity: int | None = None, split: str | None = None,
                 drop_missing_snps: bool = False, allow_duplicates: bool = False, check_images: bool = True,
                 chromosomes=None, count_a1: bool = False, split_order: str = "appearance",
                 num_classes: int | None = None):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if label_arity is not None and label_arity < 1:
            raise ValueError(f"label_arity must be None or >= 1, got {label_arity}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
        self.root = root
        self.image_size = image_size
        self.label_arity = label_arity
        self.split = split
        self.check_images = check_images
        manifest_path = os.path.join(root, manifest)
        rows = self._read_manifest(manifest_path)
        _check_duplicates(rows, manifest_path, allow_duplicates)
        # Labels and genotype ids are checked on every row, so a bad test row fails before training.
        labels = None
        if label_arity is not None:
            labels = [_parse_label(row["label"], label_arity, f"{manifest_path}: line {line}", num_classes)
                      for line, row in rows]
        all_participants = [row["participant_id"] for _, row in rows]
        keep = np.ones(len(rows), dtype=bool)
        if split is not None:
            if rows and "split" in rows[0][1]:
                keep = np.array([row["split"] == split for _, row in rows], dtype=bool)
            else:
                chosen = participant_split(all_participants, split, order=split_order)
                keep = np.array([p in chosen for p in all_participants], dtype=bool)
        if not keep.any():
            raise DataError(f"{manifest_path}: no rows" + (f" in split {split!r}" if split else ""))
        kept_rows = [row for (_, row), k in zip(rows, keep) if k]
        self.participant_ids = [row["participant_id"] for row in kept_rows]
        self.eyes = [row.get("eye", "") for row in kept_rows]
        self.image_paths = [os.path.join(root, row["image_path"]) for row in kept_rows]
        self.image_wheres = [f"{manifest_path}: line {line}: field 'image_path'"
                             for (line, _), k in zip(rows, keep) if k]
        self._labels = None if labels is None else np.stack([y for y, k in zip(labels, keep) if k])
        self._genomes = None
        self._genome_row = None
        self.snp_ids: list[str] = []
        if genotypes is not None:
            self._load_genotypes(os.path.join(root, genotypes), snp_stride, manifest_path, all_participants,
                                 drop_missing_snps, chromosomes, count_a1)

    def _read_manifest(self, path: str) -> list[tuple[int, dict[str, str]]]:
        """(line number, row) for every row of the manifest, each field validated."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: manifest not found")
        rows = []
        with open_text(path, "CSV manifest") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path}: line 1: header {header} lacks required column(s) {missing}")
            if self.label_arity is not None and "label" not in header:
                raise DataError(f"{path}: line 1: label_arity={self.label_arity} needs a 'label' column, header is {header}")
            reader.fieldnames = header
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if None in row or any(row[c] is None for c in header):
                    raise DataError(f"{where}: expected {len(header)} fields ({','.join(header)})")
                row = {k: v.strip() for k, v in row.items()}
                if not row["participant_id"]:
                    raise DataError(f"{where}: field 'participant_id' is empty")
                if "eye" in row and row["eye"] not in EYES:
                    raise DataError(f"{where}: field 'eye' = {row['eye']!r}, expected one of {EYES}")
                if "split" in row and row["split"] not in SPLITS:
                    raise DataError(f"{where}: field 'split' = {row['split']!r}, expected one of {SPLITS}")
                if self.check_images:
                    _check_image(os.path.join(self.root, row["image_path"]), where)
                elif not os.path.isfile(os.path.join(self.root, row["image_path"])):
                    raise DataError(f"{where}: field 'image_path': image file "
                                    f"{os.path.join(self.root, row['image_path'])} not found")
                rows.append((reader.line_num, row))
        return rows

    def _load_genotypes(self, prefix: str, snp_stride: int, manifest_path: str, all_participants: list[str],
                        drop_missing_snps: bool, chromosomes=None, count_a1: bool = False) -> None:
        try:
            if "{c}" in prefix:
                chromosomes = AUTOSOMES if chromosomes is None else tuple(chromosomes)
                plink = read_plink_chromosomes(prefix, chromosomes, snp_stride=snp_stride,
                                               drop_missing_snps=drop_missing_snps, count_a1=count_a1)
            else:
                plink = read_plink(prefix, snp_stride=snp_stride, drop_missing_snps=drop_missing_snps,
                                   count_a1=count_a1, chromosomes=chromosomes)
        except PlinkFormatError as e:
            raise DataError(str(e)) from e
        fam_path = (prefix.format(c=chromosomes[0]) if "{c}" in prefix else prefix) + ".fam"
        row_of = {}
        for i, iid in enumerate(plink.iids):
            if iid in row_of:
                raise DataError(f"{fam_path}: line {i + 1}: IID {iid!r} appears twice (first on line {row_of[iid] + 1})")
            row_of[iid] = i
        absent = sorted({p for p in all_participants if p not in row_of})
        if absent:
            raise DataError(f"{manifest_path}: field 'participant_id': {len(absent)} participant(s) have no genotypes "
                            f"in {fam_path} (IID column), e.g. {absent[:5]}")
        # Keep only this dataset's participants in memory (already SNP-strided by the reader).
        participants = list(dict.fromkeys(self.participant_ids))
        compact = {p: k for k, p in enumerate(participants)}
        self._genomes = plink.genotypes[[row_of[p] for p in participants]]
        self._genome_row = np.array([compact[p] for p in self.participant_ids], dtype=np.int64)
        self.snp_ids = plink.snp_ids

    @property
    def num_snps(self) -> int:
        """SNPs per genome vector (0 for an image-only dataset)."""
        return 0 if self._genomes is None else self._genomes.shape[1]

    @property
    def labels(self) -> np.ndarray:
        """All labels in item order: int32 (N,) or float32 (N, label_arity)."""
        if self._labels is None:
            raise AttributeError(f"{self.root}: labels were not loaded; construct the dataset with label_arity=...")
        return self._labels

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        item = {"image": self.load_image(index), "index": index}
        if self._genomes is not None:
            item["genome"] = self._genomes[self._genome_row[index]].copy()
        if self._labels is not None:
            item["label"] = self._labels[index].copy()
        return item
