"""The one CT preprocessing of the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv 2301.00785; the
original's `dataset/dataloader.py` validation chain): `medjax.data.readers.ct.load_ct` / `load_ct_pair` (RAS,
spacing resample, HU clipped to `hu_range` and scaled to [0, 1]), then a crop to the image foreground
(scaled intensity > 0, MONAI CropForeground, margin 0). The training/evaluation cache
(`ct_pipeline.CTVolumeCache`) and `medjax.predict.segment_file` both call `preprocess_ct`.

`CTPreprocessing.fingerprint()` hashes the settings and `PREPROCESS_VERSION` (bump it whenever the output
of `preprocess_ct` changes for the same settings); the cache keys its entries with it, so a changed setting
or code writes new entries instead of reusing stale ones."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from medjax.data.readers.ct import DEFAULT_HU_RANGE, DEFAULT_SPACING, load_ct, load_ct_pair

PREPROCESS_VERSION = 1  # bump when preprocess_ct's output changes for unchanged settings
_WHERE = "medjax/data/transforms/ct_preprocess.py"


@dataclasses.dataclass(frozen=True)
class CTPreprocessing:
    """The preprocessing settings (an experiment's `data.spacing` and `data.hu_range`)."""
    spacing: tuple[float, float, float] = DEFAULT_SPACING  # mm, isotropic 1.5 in the paper
    hu_range: tuple[float, float] = DEFAULT_HU_RANGE  # HU window scaled to [0, 1], (-175, 250) in the paper

    def __post_init__(self):
        spacing, hu_range = tuple(float(v) for v in self.spacing), tuple(float(v) for v in self.hu_range)
        for field, ok, expected in (
                ("spacing", len(spacing) == 3 and min(spacing) > 0, "three positive numbers (mm)"),
                ("hu_range", len(hu_range) == 2 and hu_range[0] < hu_range[1], "(low, high) HU, low < high")):
            if not ok:
                raise ValueError(f"{_WHERE}: {field} (config data.{field}) must be {expected}, got "
                                 f"{getattr(self, field)}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "hu_range", hu_range)

    def fingerprint(self) -> str:
        """16 hex digits of sha1 over PREPROCESS_VERSION and the settings: equal iff both are."""
        key = json.dumps({"version": PREPROCESS_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PreprocessedCT:
    """A preprocessed case: the foreground crop of the resampled RAS grid (`grid_shape`, `grid_affine`)."""
    image: np.ndarray  # float32 (x, y, z) in [0, 1], the crop
    label: np.ndarray | None  # uint8 class ids on the crop, when a label was given
    box: tuple[slice, slice, slice]  # the crop inside the grid
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """voxel -> world of the crop: the grid's affine moved to the box's corner."""
        affine = self.grid_affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in self.box], dtype=np.float64)
        return affine


def foreground_box(image: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of image > 0 (MONAI CropForeground, margin 0); the whole volume if none."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(image > 0, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, image.shape[axis]))
    return tuple(box)  # type: ignore[return-value]


def preprocess_ct(image_path: str, label_path: str | None = None, *,
                  preprocessing: CTPreprocessing = CTPreprocessing()) -> PreprocessedCT:
    """`image_path` (and its label, checked against it by `load_ct_pair`) on the RAS grid at the spacing
    and HU window of `preprocessing`, cropped to the image foreground (module docstring)."""
    p = preprocessing
    if label_path is None:
        (image, affine), label = load_ct(image_path, spacing=p.spacing, hu_range=p.hu_range), None
    else:
        image, label, affine = load_ct_pair(image_path, label_path, spacing=p.spacing, hu_range=p.hu_range)
    box = foreground_box(image)
    return PreprocessedCT(image=image[box], label=None if label is None else label[box], box=box,
                          grid_shape=tuple(int(n) for n in image.shape), grid_affine=affine)  # type: ignore[arg-type]

