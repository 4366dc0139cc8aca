"""RFMiD, the Retinal Fundus Multi-disease Image Dataset (Pachade et al., Data 2021), as released and as
ContIG's loader reads it (HealthML/ContIG `data/data_rfmid.py`), for MRM's multi-label transfer task
(Yang et al., ICCV 2023, Tab. 1).

Directory layout (the released archives unpacked; the doubled folder is how they unpack, a single level is
accepted too):

    <root>/Training_Set/Training_Set/RFMiD_Training_Labels.csv     + Training/<ID>.png    (1920 images)
    <root>/Evaluation_Set/Evaluation_Set/RFMiD_Validation_Labels.csv + Validation/<ID>.png (640)
    <root>/Test_Set/Test_Set/RFMiD_Testing_Labels.csv               + Test/<ID>.png        (640)

Each CSV: header `ID,Disease_Risk,DR,ARMD,...` then one row per image: the integer ID (the image's file
name), Disease_Risk and the 45 disease columns, each 0 or 1 (`RFMID_LABELS`: 46 label columns). ContIG
drops Disease_Risk, HR and ODPM (`drop_disease_risk_hr_odpm=True`): 43 labels, the default of `drop`.
(ContIG reads `<ID>.jpg` from its own `Training_cropped/`, made by its `crop_resize_all`; here the released
PNGs are circle-cropped and resized on load, `medjax.data.transforms.image.circle_crop`.)
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np

from medjax.data.errors import DataError, DataFileNotFoundError
from medjax.data.readers.fundus_images import FundusImages

# The 46 label columns of the released CSVs, in their order (Disease_Risk, then the 45 conditions).
RFMID_LABELS = (
    "Disease_Risk", "DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS", "MS", "CSR", "ODC", "CRVO", "TV",
    "AH", "ODP", "ODE", "ST", "AION", "PT", "RT", "RS", "CRS", "EDN", "RPEC", "MHL", "RP", "CWS", "CB", "ODPM", "PRH",
    "MNF", "HR", "CRAO", "TD", "CME", "PTCR", "CF", "VH", "MCA", "VS", "BRAO", "PLQ", "HPED", "CL",
)
CONTIG_DROPPED = ("Disease_Risk", "HR", "ODPM")  # ContIG's drop_disease_risk_hr_odpm=True -> 43 labels
# split -> (set folder, label file, image folder), ContIG's RFMiD.__init__
SPLITS = {
    "train": ("Training_Set", "RFMiD_Training_Labels.csv", "Training"),
    "val": ("Evaluation_Set", "RFMiD_Validation_Labels.csv", "Validation"),
    "test": ("Test_Set", "RFMiD_Testing_Labels.csv", "Test"),
}


def split_folder(root: str, split: str) -> str:
    """`<root>/<Set>/<Set>` (the archives' doubled folder) or `<root>/<Set>`, whichever holds the labels CSV."""
    if split not in SPLITS:
        raise DataError(f"RFMiD split {split!r}: expected one of {', '.join(SPLITS)}")
    folder, labels, _ = SPLITS[split]
    for candidate in (os.path.join(root, folder, folder), os.path.join(root, folder)):
        if os.path.isfile(os.path.join(candidate, labels)):
            return candidate
    raise DataFileNotFoundError(f"{root}: no RFMiD {split} labels: expected {folder}/{folder}/{labels} "
                                f"(or {folder}/{labels}) under it")


class RFMiDDataset(FundusImages):
    """One RFMiD split: items {"image": uint8 (image_size, image_size, 3), "label": float32 (L,), "index"}.

    `drop`: label columns left out (ContIG's three by default); the remaining columns of the CSV, in its
    order, are `label_names`. Every split must have the same columns. Images circle-cropped and resized, indices
    0 .. len - 1 only (`medjax.data.readers.fundus_images`)."""

    def __init__(self, root: str, split: str, *, image_size: int, drop: Sequence[str] = CONTIG_DROPPED):
        self.root, self.split, self.image_size = root, split, int(image_size)
        folder = split_folder(root, split)
        labels_file = os.path.join(folder, SPLITS[split][1])
        image_dir = os.path.join(folder, SPLITS[split][2])
        with open(labels_file, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows or not rows[0] or rows[0][0].strip() != "ID":
            raise DataError(f"{labels_file}: line 1: expected a header starting with 'ID' followed by the label "
                            f"columns ({', '.join(RFMID_LABELS[:4])}, ...)")
        header = [h.strip() for h in rows[0]]
        missing = [d for d in drop if d not in header[1:]]
        if missing:
            raise DataError(f"{labels_file}: line 1: the columns {missing} to drop (config data.drop_labels) are not "
                            f"in the header {header[1:8]}...; drop only columns the file has")
        keep = [j for j, h in enumerate(header) if j > 0 and h not in drop]
        if not keep:
            raise DataError(f"{labels_file}: line 1: no label columns left after dropping {list(drop)}")
        self.label_names = tuple(header[j] for j in keep)
        self.image_paths, self.image_wheres, labels = [], [], []
        for line, row in enumerate(rows[1:], start=2):
            if not row or not "".join(row).strip():
                continue
            where = f"{labels_file}: line {line}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, expected {len(header)} (the header's)")
            image_id = row[0].strip()
            if not image_id:
                raise DataError(f"{where}: field 'ID' is empty; expected the image's number")
            values = []
            for j in keep:
                if row[j].strip() not in ("0", "1"):
                    raise DataError(f"{where}: field {header[j]!r} = {row[j]!r}, expected 0 or 1")
                values.append(float(row[j]))
            self.image_paths.append(os.path.join(image_dir, f"{image_id}.png"))
            self.image_wheres.append(f"{where} (ID {image_id})")
            labels.append(values)
        if not labels:
            raise DataError(f"{labels_file}: no rows")
        self._labels = np.asarray(labels, np.float32)

    @property
    def labels(self) -> np.ndarray:
        """(N, L) float32 0/1, in row order."""
        return self._labels

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        return {"image": self.load_image(index), "label": self._labels[index].copy(), "index": index}
