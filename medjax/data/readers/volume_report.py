"""CT volume-report pairs (UniMedI's 3D data, BIMCV-like layout; He et al., ECCV 2024), from a JSONL manifest:

    {"volume": "volumes/0001.nii.gz", "captions": ["Report text."], "split": "train", "labels": [0, 1]}

`volume` is relative to the manifest's folder; `split` (train / val / test) and `labels` (a list of 0/1 per
class, for linear probing) are optional. A volume is read by the CT pipeline's reader (`medjax.data.readers.ct.load_ct`:
RAS, resampled to `spacing`, HU window scaled to [0, 1]), laid out (slices, H, W) = (z, y, x) (axial slices,
the first slice the most inferior), and resized trilinearly to `volume_shape` (the ViT's fixed T_3D grid).
Every bad row raises DataError naming the file, the line and the field.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from medjax.data.readers.ct import CTDataError, DEFAULT_HU_RANGE, DEFAULT_SPACING, load_ct, read_nifti_header
from medjax.data.errors import DataError
from medjax.data.readers.image_report import SPLITS, _check_captions, read_jsonl


def resize_volume(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize (scipy `zoom`, order 1, grid corners aligned) of (D, H, W) to `shape`, float32."""
    if tuple(volume.shape) == tuple(shape):
        return volume.astype(np.float32)
    factors = [t / s for t, s in zip(shape, volume.shape)]
    out = ndimage.zoom(volume.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
    if out.shape != tuple(shape):  # zoom rounds the output shape; pad/crop the odd voxel
        out = out[tuple(slice(0, s) for s in shape)]
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape)], mode="edge")
    return out


class VolumeReportDataset:
    """Random-access (volume, report) samples: {"volume": (D, H, W) float32 in [0, 1], "caption": str,
    "labels": (C,) float32 (when the manifest has them), "index": int}."""

    def __init__(self, path: str, *, split: str | None = None, volume_shape: Sequence[int] = (32, 224, 224),
                 spacing: Sequence[float] = DEFAULT_SPACING, hu_range: Sequence[float] = DEFAULT_HU_RANGE,
                 check_headers: bool = True):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
        self.path, self.volume_shape = path, tuple(int(s) for s in volume_shape)
        self.spacing, self.hu_range = tuple(spacing), tuple(hu_range)
        root = os.path.dirname(os.path.abspath(path))
        self.lines, self.volumes, self.captions, self.labels = [], [], [], []
        for line, row in read_jsonl(path, ("volume", "captions")):
            where = f"{path}: line {line}"
            if "split" in row and row["split"] not in SPLITS:
                raise DataError(f"{where}: field 'split' = {row['split']!r}, expected one of {SPLITS}")
            if split is not None and row.get("split") != split:
                continue
            if not isinstance(row["volume"], str) or not row["volume"].endswith((".nii", ".nii.gz")):
                raise DataError(f"{where}: field 'volume' must be a relative .nii / .nii.gz path, got {row['volume']!r}")
            volume = os.path.join(root, row["volume"])
            if not os.path.isfile(volume):
                raise DataError(f"{where}: field 'volume': file {volume} not found")
            if check_headers:
                try:
                    read_nifti_header(volume)
                except CTDataError as e:
                    raise DataError(f"{where}: field 'volume': {e}") from None
            caps = _check_captions(row["captions"], where, "captions")
            labels = row.get("labels")
            if labels is not None:
                if not isinstance(labels, list) or not all(v in (0, 1) for v in labels):
                    raise DataError(f"{where}: field 'labels' must be a list of 0/1, got {labels!r:.80}")
                if self.labels and len(labels) != len(self.labels[-1]):
                    raise DataError(f"{where}: field 'labels' has {len(labels)} entries, earlier rows "
                                    f"{len(self.labels[-1])}")
            elif self.labels:
                raise DataError(f"{where}: field 'labels' missing (earlier rows have it)")
            self.lines.append(line)
            self.volumes.append(volume)
            self.captions.append(caps[0])
            if labels is not None:
                self.labels.append(labels)
        if not self.lines:
            raise DataError(f"{path}: no rows" + (f" in split {split!r}" if split else ""))

    @property
    def num_labels(self) -> int:
        return len(self.labels[0]) if self.labels else 0

    def where(self, i: int) -> str:
        return f"{self.path}: line {self.lines[i]} ({self.volumes[i]})"

    def describe(self, i: int) -> str:
        """Which file sample i is (medjax.data.pipelines.bad_examples names it when it fails to load)."""
        return self.where(i)

    def load_volume(self, i: int) -> np.ndarray:
        """(D, H, W) float32 in [0, 1]: axial slices (z), rows (y), columns (x) of the RAS volume."""
        try:
            volume, _ = load_ct(self.volumes[i], spacing=self.spacing, hu_range=self.hu_range)
        except CTDataError as e:
            raise DataError(f"{self.where(i)}: {e}") from None
        return resize_volume(np.transpose(volume, (2, 1, 0)), self.volume_shape)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> dict:
        out = {"volume": self.load_volume(i), "caption": self.captions[i], "index": i}
        if self.labels:
            out["labels"] = np.asarray(self.labels[i], np.float32)
        return out
