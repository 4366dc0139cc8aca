"""fVLM's data (Shui et al., ICLR 2025; the preprocessing and `BlipPretrain` of alibaba-damo-academy/fvlm):
CT-RATE volumes with anatomy masks and per-organ report texts, cropped around the organs.

Layout of `data.dir` (CT-RATE's, one folder per split; `python -m medjax.data make-demo --kind ct_reports`):
  <split>/volumes/<key>.nii.gz        the CT (HU after the header's slope/intercept)
  <split>/masks/<key>.nii.gz          anatomy labels on the same grid: merged (1 lung, 2 heart, 3 esophagus,
                                      4 aorta) or, with data.mask_labels="totalsegmentator", TotalSegmentator
                                      `total` classes merged by TOTALSEGMENTATOR_TO_ANATOMY
  <split>_findings.json, <split>_conclusions.json    {key: {organ: text}}
  <split>_labels.csv                  VolumeName + label columns (0/1), for the zero-shot evaluation

Per organ: text = conclusion + " " + findings; an empty conclusion becomes "<organ> shows no significant
abnormalities." and the organ is NORMAL exactly when its text starts with that sentence; the text encoder
sees the text with the template removed (unless the text is only the template), as the original. Equal
texts get one id (`text_ids`, per organ over the whole split), so the loss compares integers.

Volume preprocessing (the reference): resampled to 1 x 1 x 3 mm (x, y, z) with the CT pipeline's reader
(RAS: our choice, the original does not reorient), laid out (D, H, W) = (z, y, x), HU window [-1150, 350]
-> [0, 1], cropped to the bounding box of all organ labels +-(5, 20, 20) voxels, padded with PAD_VALUE = 0.0
(= HU -1150, the window's low end: the original's MONAI `SpatialPadd(mode="constant")`, value 0, after
`ScaleIntensityRanged`) to at least the crop shape; then a random crop of `crop_shape` with a flip per axis at p = 0.2 (train) or the centre crop
(eval). An organ is INTACT when every one of its voxels lies in the crop.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import numpy as np

from medjax.data.errors import DataError, DataFileNotFoundError
from medjax.data.readers.ct import CTDataError, load_ct_pair
from medjax.data.readers.image_report import tokenize
from medjax.data.verify import FileCheck
from medjax.errors import MedjaxInputError

ORGANS = ("lung", "heart", "esophagus", "aorta")
SPACING = (1.0, 1.0, 3.0)  # mm (x, y, z)
HU_RANGE = (-1150.0, 350.0)
PAD_VALUE = 0.0  # padding of the windowed volume: HU_RANGE[0] = -1150 HU after the window (as the original)
MARGIN = (5, 20, 20)  # (D, H, W) voxels around the organs' bounding box
# TotalSegmentator v2 `total` class -> anatomy (1 lung: the five lobes; 2 heart + left atrial appendage;
# 3 esophagus; 4 aorta); every other class is background.
TOTALSEGMENTATOR_TO_ANATOMY = {10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 51: 2, 61: 2, 15: 3, 52: 4}
MASK_LABELS = ("merged", "totalsegmentator")


def normal_template(organ: str) -> str:
    return f"{organ} shows no significant abnormalities."


def organ_text(conclusion: str, findings: str, organ: str) -> str:
    """The original's per-organ text: conclusion + findings, an empty conclusion replaced by the template."""
    conclusion = conclusion.strip() or normal_template(organ)
    return f"{conclusion} {findings.strip()}".strip()


def encoder_text(text: str, organ: str) -> str:
    """What the text encoder sees: the template removed from a normal organ's text (unless nothing else is left)."""
    template = normal_template(organ)
    return text[len(template):].strip() if text.startswith(template) and text != template else text


def merge_totalsegmentator(labels: np.ndarray) -> np.ndarray:
    """TotalSegmentator `total` classes -> the 4 anatomies (TOTALSEGMENTATOR_TO_ANATOMY), uint8."""
    table = np.zeros(256, np.uint8)
    for source, target in TOTALSEGMENTATOR_TO_ANATOMY.items():
        table[source] = target
    return table[labels]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"{path}: file not found (per-organ texts {{scan_key: {{organ: text}}}})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{scan_key: {{organ: text}}}}, got {type(data).__name__}")
    return data


def _read_labels(path: str) -> tuple[list[str], dict[str, list[int]]]:
    if not os.path.isfile(path):
        return [], {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["VolumeName"]:
        raise DataError(f"{path}: line 1: expected a header starting with 'VolumeName'")
    names, out = rows[0][1:], {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]) or any(v not in ("0", "1") for v in row[1:]):
            raise DataError(f"{path}: line {line}: expected VolumeName and {len(names)} 0/1 labels, got {row!r:.120}")
        out[row[0].removesuffix(".gz").removesuffix(".nii")] = [int(v) for v in row[1:]]
    return names, out


class CTReportDataset:
    """Random access to one split: {"volume" (D, H, W) float32 in [0, 1], "mask" (D, H, W) uint8 (0..4), "texts"
    (organs,) encoder texts, "normal" (organs,) bool, "text_ids" (organs,) int32, "labels" (L,) float32 if the
    split has a label CSV, "index"}. Missing files, organs or texts raise DataError naming file, key and organ."""

    def __init__(self, root: str, split: str, *, organs: Sequence[str] = ORGANS, mask_labels: str = "merged"):
        if mask_labels not in MASK_LABELS:
            raise MedjaxInputError(f"data.mask_labels={mask_labels!r}: expected one of {', '.join(MASK_LABELS)}")
        self.root, self.split, self.organs, self.mask_labels = root, split, tuple(organs), mask_labels
        findings_path = os.path.join(root, f"{split}_findings.json")
        conclusions_path = os.path.join(root, f"{split}_conclusions.json")
        findings, conclusions = _read_json(findings_path), _read_json(conclusions_path)
        self.label_names, labels = _read_labels(os.path.join(root, f"{split}_labels.csv"))
        self.keys, self.volumes, self.masks, self.texts, self.labels = [], [], [], [], []
        for key in findings:
            volume = os.path.join(root, split, "volumes", f"{key}.nii.gz")
            mask = os.path.join(root, split, "masks", f"{key}.nii.gz")
            for path, what in ((volume, "volume"), (mask, "mask")):
                if not os.path.isfile(path):
                    raise DataFileNotFoundError(f"{findings_path}: scan {key!r}: its {what} {path} not found")
            texts = []
            for organ in self.organs:
                for path, table in ((findings_path, findings), (conclusions_path, conclusions)):
                    entry = table.get(key)
                    if not isinstance(entry, dict) or not isinstance(entry.get(organ), str):
                        raise DataError(f"{path}: scan {key!r}: field {organ!r}: missing or not a text "
                                        f"(expected {{organ: text}} for organs {', '.join(self.organs)})")
                texts.append(organ_text(conclusions[key][organ], findings[key][organ], organ))
            if self.label_names and key not in labels:
                raise DataError(f"{os.path.join(root, f'{split}_labels.csv')}: no row for scan {key!r}")
            self.keys.append(key), self.volumes.append(volume), self.masks.append(mask), self.texts.append(texts)
            if self.label_names:
                self.labels.append(labels[key])
        if not self.keys:
            raise DataError(f"{findings_path}: no scans")
        self.normal = np.asarray([[t.startswith(normal_template(o)) for t, o in zip(row, self.organs)]
                                  for row in self.texts])
        ids = []
        for j in range(len(self.organs)):
            vocabulary = {t: i for i, t in enumerate(sorted({row[j] for row in self.texts}))}
            ids.append([vocabulary[row[j]] for row in self.texts])
        self.text_ids = np.asarray(ids, np.int32).T  # (scans, organs)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, i: int) -> str:
        return f"scan {self.keys[i]!r} ({self.volumes[i]}, mask {self.masks[i]})"

    def file_checks(self) -> list[FileCheck]:
        """The start-up check (medjax.data.verify): each volume and its mask, shapes and affines equal."""
        return [FileCheck("ct_pair", (v, m), f"{self.split}: scan {k!r}") for k, v, m in
                zip(self.keys, self.volumes, self.masks)]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(volume, mask) (D, H, W), preprocessed up to the crop (module docstring)."""
        try:
            volume, mask, _ = load_ct_pair(self.volumes[i], self.masks[i], spacing=SPACING, hu_range=HU_RANGE,
                                           check_air=False)
        except CTDataError as e:
            raise DataError(f"{self.describe(i)}: {e}") from None
        if self.mask_labels == "totalsegmentator":
            mask = merge_totalsegmentator(mask)
        elif mask.max() > len(self.organs):
            raise DataError(f"{self.masks[i]}: label value {int(mask.max())} is not an anatomy (expected 0..{len(self.organs)}: "
                            f"{', '.join(f'{k + 1} {o}' for k, o in enumerate(self.organs))}; set "
                            "data.mask_labels=totalsegmentator for TotalSegmentator classes)")
        return np.ascontiguousarray(volume.transpose(2, 1, 0)), np.ascontiguousarray(mask.transpose(2, 1, 0))

    def __getitem__(self, i: int) -> dict:
        volume, mask = self.load(i)
        item = {"volume": volume, "mask": mask, "texts": [encoder_text(t, o) for t, o in zip(self.texts[i], self.organs)],
                "normal": self.normal[i], "text_ids": self.text_ids[i], "index": i}
        if self.labels:
            item["labels"] = np.asarray(self.labels[i], np.float32)
        return item


def organ_box_crop(volume: np.ndarray, mask: np.ndarray, margin: Sequence[int] = MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the bounding box of all organ voxels +- margin (clipped to the volume)."""
    where = np.argwhere(mask > 0)
    if not len(where):
        return volume, mask
    low = np.maximum(where.min(0) - np.asarray(margin), 0)
    high = np.minimum(where.max(0) + 1 + np.asarray(margin), mask.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return volume[box], mask[box]


def crop_organs(volume: np.ndarray, mask: np.ndarray, crop_shape: Sequence[int], num_organs: int,
                rng: np.random.Generator | None, flip_p: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume, mask, intact (organs,) bool) of `crop_shape` (module docstring); rng None: the centre crop, no flip."""
    volume, mask = organ_box_crop(volume, mask)
    pad = [(0, max(0, c - s)) for c, s in zip(crop_shape, volume.shape)]
    volume, mask = np.pad(volume, pad, constant_values=PAD_VALUE), np.pad(mask, pad)
    counts = np.bincount(mask.ravel(), minlength=num_organs + 1)[1:num_organs + 1]
    if rng is None:
        start = [(s - c) // 2 for s, c in zip(volume.shape, crop_shape)]
    else:
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, crop_shape)]
    box = tuple(slice(a, a + c) for a, c in zip(start, crop_shape))
    volume, mask = volume[box], mask[box]
    inside = np.bincount(mask.ravel(), minlength=num_organs + 1)[1:num_organs + 1]
    intact = (counts > 0) & (inside == counts)
    if rng is not None:
        for axis in range(3):
            if rng.random() < flip_p:
                volume, mask = np.flip(volume, axis), np.flip(mask, axis)
    return np.ascontiguousarray(volume), np.ascontiguousarray(mask), intact


class FVLMExample:
    """Picklable (dataset item, rng) -> a training example: volumes (D, H, W, 1), masks (D, H, W) int32,
    input_ids / attention_mask (organs, T), normal / intact (organs,) bool, text_ids (organs,) int32."""

    def __init__(self, tokenizer, crop_shape: Sequence[int], max_length: int, train: bool = True, flip_p: float = 0.2):
        self.tokenizer, self.crop_shape, self.max_length = tokenizer, tuple(int(c) for c in crop_shape), int(max_length)
        self.train, self.flip_p = train, float(flip_p)

    def __call__(self, item: dict, rng: np.random.Generator | None = None) -> dict:
        organs = len(item["texts"])
        volume, mask, intact = crop_organs(item["volume"], item["mask"], self.crop_shape, organs,
                                           rng if self.train else None, self.flip_p)
        tokens = [tokenize(self.tokenizer, text, self.max_length) for text in item["texts"]]
        return {"volumes": volume[..., None].astype(np.float32), "masks": mask.astype(np.int32),
                "input_ids": np.stack([t["input_ids"] for t in tokens]),
                "attention_mask": np.stack([t["attention_mask"] for t in tokens]),
                "normal": np.asarray(item["normal"], bool), "intact": intact,
                "text_ids": np.asarray(item["text_ids"], np.int32)}
