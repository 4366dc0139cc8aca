"""Partial-label CT training data for the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv
2301.00785; the original's `dataset/dataloader.py` transform chain), on Grain.

List files hold `image<TAB>label` lines, paths relative to a data root; the case's dataset id (two
characters, "10_NN" for Decathlon tasks; `medjax.ontology.universal_classes`) selects its label template. Per case, once:
`ct_preprocess.preprocess_ct` (RAS, spacing, HU window, crop to the image foreground > 0), split the label into
an organ map (tumour voxels carry their organ, nearest kidney for kidney lesions) and a tumour map,
save as .npy in the cache dir. Per training sample (seeded by the passed np.random.Generator):
virtual symmetric zero-pad to the crop size; for Decathlon sets a random zoom (p 0.3, factor
U(1.3, 1.5), area for the image, nearest for labels, centre-cropped back: MONAI RandZoom); a crop
centre drawn positive:negative 2:1 (positive: any label; negative: background with image > 0;
MONAI RandCropByPosNegLabel) or, for tumour sets, by class 1:1:5 (background : organ : tumour,
within image > 0; MONAI RandCropByLabelClasses), clamped so the crop fits; rotate by k*90 degrees,
k in {1, 2, 3}, in the x-y plane (p 0.1); intensity shift U(-0.1, 0.1) (p 0.2).

Samples: {"image": float32 (X, Y, Z, 1), "label": uint8 (X, Y, Z, 32) one channel per class,
"label_mask": bool (32,) True for the classes the case's dataset annotates}; unannotated channels
are zero and must get no loss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence

import grain
import numpy as np
from scipy import ndimage

from medjax.ontology import universal_classes as templates
from medjax.data.readers.ct import DEFAULT_HU_RANGE, DEFAULT_SPACING, CTDataError, check_label_grid
from medjax.data.transforms.ct_preprocess import PREPROCESS_VERSION, CTPreprocessing, foreground_box, preprocess_ct
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.data.readers.text_io import open_text

CACHE_VERSION = 1  # the entry layout and label split (split_tumours, _counts); preprocessing: PREPROCESS_VERSION
_MSD_TASK = re.compile(r"Task(\d\d)")


@dataclasses.dataclass(frozen=True)
class CTCase:
    """One image/label pair of a list file; `where` is "list file: line N" for error messages."""
    image: str
    label: str
    dataset_id: str
    where: str


def dataset_id_of(relative_path: str) -> str | None:
    """The template key of a case path: its first two characters, "10_NN" for Decathlon "TaskNN"."""
    prefix = relative_path[:2]
    if prefix == "10":
        match = _MSD_TASK.search(relative_path)
        return f"10_{match.group(1)}" if match else None
    return prefix if prefix in templates.TEMPLATES else None


def read_ct_list(list_path: str, root: str, *, check_headers: bool = True) -> list[CTCase]:
    """The cases of a list file; every line is checked (fields, files, dataset id and, with
    `check_headers`, that each label's shape and affine match its image) before training starts."""
    if not os.path.isfile(list_path):
        raise CTDataError(f"{list_path}: list file not found")
    cases = []
    with open_text(list_path, "list file (image<TAB>label lines)") as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            where = f"{list_path}: line {number}"
            fields = text.split("\t") if "\t" in text else text.split()
            if len(fields) != 2 or not all(fields):
                raise CTDataError(f"{where}: {text!r} has {len(fields)} field(s); expected 'image<TAB>label'")
            image_rel, label_rel = (field.strip() for field in fields)
            key = dataset_id_of(image_rel)
            if key is None:
                raise CTDataError(f"{where}: image path {image_rel!r} does not start with a known dataset id "
                                  f"({', '.join(sorted(templates.TEMPLATES))}; Decathlon paths need 'TaskNN')")
            if dataset_id_of(label_rel) != key:
                raise CTDataError(f"{where}: label path {label_rel!r} is not in the image's dataset {key}")
            image, label = os.path.join(root, image_rel), os.path.join(root, label_rel)
            for field, path in (("image", image), ("label", label)):
                if not os.path.isfile(path):
                    raise CTDataError(f"{where}: {field} file {path} not found")
            if check_headers:
                try:
                    check_label_grid(label, image)
                except CTDataError as e:
                    raise CTDataError(f"{where}: {e}") from e
            cases.append(CTCase(image, label, key, where))
    if not cases:
        raise CTDataError(f"{list_path}: no cases (expected 'image<TAB>label' lines)")
    return cases


def split_tumours(label: np.ndarray, dataset_id: str, path: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(organ map, tumour map) of a class-id label: tumour classes move to the tumour map and their
    voxels take their organ's id in the organ map (`universal_classes.TUMOUR_ORGANS`, when the dataset
    annotates that organ; kidney lesions take the nearest annotated kidney, else the kidney on their
    side of the volume). Values outside the dataset's template are an error naming `path`."""
    classes = templates.TEMPLATES[dataset_id]
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    unexpected = sorted(set(present.tolist()) - {0, *classes})
    if unexpected:
        raise CTDataError(f"{path}: label values {unexpected} are not classes of dataset {dataset_id} (expected a "
                          f"subset of {sorted(classes)}); label files hold Universal Model class ids (medjax.ontology.universal_classes)")
    is_tumour = np.isin(label, list(templates.TUMOUR_CLASSES))
    tumour = np.where(is_tumour, label, 0).astype(np.uint8)
    organ = np.where(is_tumour, 0, label).astype(np.uint8)
    for lesion, candidates in templates.TUMOUR_ORGANS.items():
        candidates = [c for c in candidates if c in classes]
        where = tumour == lesion
        if not candidates or not where.any():
            continue
        if len(candidates) == 1:
            organ[where] = candidates[0]
            continue
        near = np.isin(organ, candidates)
        if near.any():  # the label of the nearest candidate-organ voxel, searched in their bounding box
            box = foreground_box(where | near)
            sub_where, sub_organ = where[box], organ[box]
            _, index = ndimage.distance_transform_edt(~np.isin(sub_organ, candidates), return_indices=True)
            sub_organ[sub_where] = sub_organ[tuple(i[sub_where] for i in index)]
        else:  # RAS: x grows towards the patient's right; candidates are (right, left)
            right = np.arange(label.shape[0])[:, None, None] >= label.shape[0] / 2
            organ[where] = np.where(np.broadcast_to(right, label.shape)[where], candidates[0], candidates[1])
    return organ, tumour


def label_channels(organ: np.ndarray, tumour: np.ndarray, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (..., 32) one channel per class, bool (32,) annotated classes) of a case's maps."""
    mask = np.zeros(templates.NUM_CLASSES, dtype=bool)
    channels = np.zeros(organ.shape + (templates.NUM_CLASSES,), dtype=np.uint8)
    for c in templates.TEMPLATES[dataset_id]:
        mask[c - 1] = True
        channels[..., c - 1] = (tumour if c in templates.TUMOUR_CLASSES else organ) == c
    return channels, mask


class CTVolumeCache:
    """Preprocessed cases (`ct_preprocess.preprocess_ct`) as .npy files under `cache_dir`, made on first use.
    A case's entry is keyed by CACHE_VERSION, the preprocessing fingerprint (settings + PREPROCESS_VERSION)
    and the case's paths, file sizes and modification times, so a changed file, setting or preprocessing
    code makes a new entry. Writes are atomic (safe with several loader threads)."""

    def __init__(self, cache_dir: str, *, spacing: Sequence[float] = DEFAULT_SPACING,
                 hu_range: Sequence[float] = DEFAULT_HU_RANGE):
        self.cache_dir = cache_dir
        self.preprocessing = CTPreprocessing(spacing, hu_range)  # type: ignore[arg-type]

    def entry_dir(self, case: CTCase) -> str:
        stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (case.image, case.label)]
        key = json.dumps([CACHE_VERSION, self.preprocessing.fingerprint(), stats])
        stem = os.path.basename(case.image).split(".")[0]
        return os.path.join(self.cache_dir, f"{case.dataset_id}-{stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")

    def load(self, case: CTCase) -> dict:
        """{"image", "organ", "tumour": memory-mapped arrays, "meta": dict}, preprocessing if needed."""
        entry = self.entry_dir(case)
        if not os.path.isfile(os.path.join(entry, "meta.json")):
            self._write(case, entry)
        with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = {name: np.load(os.path.join(entry, f"{name}.npy"), mmap_mode="r")
                  for name in ("image", "organ", "tumour")}
        return {**arrays, "meta": meta}

    def _write(self, case: CTCase, entry: str) -> None:
        try:
            pre = preprocess_ct(case.image, case.label, preprocessing=self.preprocessing)
        except CTDataError as e:  # name the list file's line too
            raise CTDataError(f"{case.where}: {e}") from e
        organ, tumour = split_tumours(pre.label, case.dataset_id, case.label)
        meta = {"image": case.image, "label": case.label, "dataset_id": case.dataset_id,
                "affine": pre.affine.tolist(), "box": [[s.start, s.stop] for s in pre.box],
                "preprocessing": {**dataclasses.asdict(self.preprocessing), "version": PREPROCESS_VERSION},
                "counts": _counts(organ, tumour, pre.image > 0)}
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir)
        try:
            for name, array in (("image", pre.image), ("organ", organ), ("tumour", tumour)):
                np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(array))
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            try:
                os.rename(tmp, entry)
            except OSError:  # another worker finished the same entry first
                if not os.path.isfile(os.path.join(entry, "meta.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _counts(organ: np.ndarray, tumour: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """Voxel counts of the crop-centre sets: positive, negative, and the classes bg/organ/tumour."""
    labelled = (organ > 0) | (tumour > 0)
    return {"positive": int(labelled.sum()), "negative": int((valid & ~labelled).sum()),
            "class_0": int((valid & ~labelled).sum()), "class_1": int((valid & (organ > 0) & (tumour == 0)).sum()),
            "class_2": int((valid & (tumour > 0)).sum())}


def _sample_where(condition: Callable, size: int, count: int, rng: np.random.Generator) -> int:
    """A flat index drawn uniformly from the `count` (> 0) indices in [0, size) where `condition`
    (a function of an index array) holds: rejection sampling, then an exact scan if that keeps missing."""
    batch = int(min(max(3 * size / count, 64), 1 << 20))  # about 3 expected hits per batch
    for _ in range(8):
        draws = rng.integers(0, size, batch)
        hits = np.flatnonzero(condition(draws))
        if hits.size:
            return int(draws[hits[0]])
    candidates = np.flatnonzero(condition(np.arange(size)))
    return int(candidates[rng.integers(len(candidates))])


def choose_crop_center(image: np.ndarray, organ: np.ndarray, tumour: np.ndarray, counts: dict[str, int],
                       rng: np.random.Generator, *, class_ratios: Sequence[float] | None = None,
                       pos: float = 2.0, neg: float = 1.0, source: str = "volume") -> tuple[int, int, int]:
    """A crop-centre voxel: positive:negative `pos:neg` (MONAI RandCropByPosNegLabel, image threshold
    0), or with `class_ratios` by class background:organ:tumour (MONAI RandCropByLabelClasses); an
    empty set gets ratio 0. `source` names the volume in errors."""
    flat_image, flat_organ, flat_tumour = (a.reshape(-1) for a in (image, organ, tumour))
    labelled = lambda i: (flat_organ[i] > 0) | (flat_tumour[i] > 0)
    sets = {"positive": labelled, "negative": lambda i: (flat_image[i] > 0) & ~labelled(i),
            "class_0": lambda i: (flat_image[i] > 0) & ~labelled(i),
            "class_1": lambda i: (flat_image[i] > 0) & (flat_organ[i] > 0) & (flat_tumour[i] == 0),
            "class_2": lambda i: (flat_image[i] > 0) & (flat_tumour[i] > 0)}
    if class_ratios is None:
        names, weights = ("positive", "negative"), [pos, neg]
    else:
        names, weights = ("class_0", "class_1", "class_2"), list(class_ratios)
    weights = np.array([w if counts[n] > 0 else 0.0 for n, w in zip(names, weights)], dtype=np.float64)
    if weights.sum() <= 0:
        raise CTDataError(f"{source}: no crop centre available: no labelled voxel and no image voxel > 0")
    name = names[rng.choice(len(names), p=weights / weights.sum())]
    flat = _sample_where(sets[name], image.size, counts[name], rng)
    return tuple(int(i) for i in np.unravel_index(flat, image.shape))  # type: ignore[return-value]


def extract_window(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[start : start + size] with zeros where the window leaves the array."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(np.add(start, size), array.shape)
    if (hi > lo).all():
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        out[dst] = array[tuple(slice(l, h) for l, h in zip(lo, hi))]
    return out


def zoom_keep_size(image: np.ndarray, labels: Sequence[np.ndarray],
                   factor: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Zoom in by `factor` >= 1 and centre-crop back to the input shape (MONAI Zoom, keep_size): the
    image with 'area' interpolation (adaptive average pooling: output k of m = floor(n * factor)
    averages inputs floor(k n / m) .. ceil((k + 1) n / m) - 1, one or two voxels when zooming in),
    labels with 'nearest' (torch's floor(k * n / m) rule)."""
    if factor < 1.0:
        raise ValueError(f"zoom factor must be >= 1, got {factor}")
    image = np.asarray(image, dtype=np.float32)
    labels = list(labels)
    for axis, n in enumerate(image.shape):
        m = int(math.floor(n * factor))
        k = np.arange(n) + (m // 2 - n // 2)  # kept indices of the zoomed axis (centre crop)
        first, last = (k * n) // m, ((k + 1) * n + m - 1) // m - 1
        zoomed = np.take(image, first, axis=axis)
        two = np.flatnonzero(last > first)
        where = tuple(two if a == axis else slice(None) for a in range(3))
        zoomed[where] = (zoomed[where] + np.take(image, last[two], axis=axis)) * np.float32(0.5)
        image = zoomed
        nearest = np.minimum(np.floor(k.astype(np.float32) * np.float32(n / m)).astype(np.int64), n - 1)
        labels = [np.take(label, nearest, axis=axis) for label in labels]
    return image, labels


@dataclasses.dataclass(frozen=True)
class CTAugment:
    """Training crops and augmentation (the original's defaults; `crop_size` e.g. 16 in tests)."""
    crop_size: tuple[int, int, int] = (96, 96, 96)
    pos: float = 2.0
    neg: float = 1.0
    class_ratios: tuple[float, float, float] = (1.0, 1.0, 5.0)
    rotate90_prob: float = 0.1
    shift_prob: float = 0.2
    shift_offset: float = 0.1
    zoom_prob: float = 0.3
    zoom_range: tuple[float, float] = (1.3, 1.5)

    def __post_init__(self):
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be three positive sizes, got {self.crop_size}")
        if self.rotate90_prob > 0 and self.crop_size[0] != self.crop_size[1]:
            raise ValueError(f"rotate90 in the x-y plane needs crop_size[0] == crop_size[1], got {self.crop_size}")
        if not 1.0 <= self.zoom_range[0] <= self.zoom_range[1]:
            raise ValueError(f"zoom_range must satisfy 1 <= low <= high, got {self.zoom_range}")


class CTTrainTransform:
    """Picklable Grain map: a cached case -> one augmented training crop (module docstring)."""

    def __init__(self, augment: CTAugment):
        self.augment = augment

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        aug, key = self.augment, example["dataset_id"]
        image, organ, tumour, counts = example["image"], example["organ"], example["tumour"], example["meta"]["counts"]
        crop = np.asarray(aug.crop_size)
        padded = np.maximum(image.shape, crop)
        offset = (padded - image.shape) // 2  # symmetric zero padding (MONAI SpatialPad), kept virtual
        if key in templates.ZOOM_DATASETS and rng.random() < aug.zoom_prob:
            image, organ, tumour = (extract_window(np.asarray(a), -offset, padded) for a in (image, organ, tumour))
            image, (organ, tumour) = zoom_keep_size(image, (organ, tumour), rng.uniform(*aug.zoom_range))
            counts, offset = _counts(organ, tumour, image > 0), np.zeros(3, dtype=np.int64)
        ratios = aug.class_ratios if key in templates.CLASS_RATIO_CROP_DATASETS else None
        center = choose_crop_center(image, organ, tumour, counts, rng, class_ratios=ratios, pos=aug.pos, neg=aug.neg,
                                    source=example["meta"].get("image", "volume"))
        start = np.clip(np.asarray(center) + offset - crop // 2, 0, padded - crop) - offset
        image, organ, tumour = (extract_window(a, start, crop) for a in (image, organ, tumour))
        if rng.random() < aug.rotate90_prob:
            k = int(rng.integers(1, 4))
            image, organ, tumour = (np.rot90(a, k, axes=(0, 1)) for a in (image, organ, tumour))
        if rng.random() < aug.shift_prob:
            image = image + np.float32(rng.uniform(-aug.shift_offset, aug.shift_offset))
        label, mask = label_channels(organ, tumour, key)
        return {"image": np.ascontiguousarray(image, dtype=np.float32)[..., None], "label": label, "label_mask": mask}


class CTVolumeSource(Sequence):
    """Random access to cached cases: {"image", "organ", "tumour", "meta", "dataset_id"}."""

    def __init__(self, cases: Sequence[CTCase], cache: CTVolumeCache):
        self.cases, self.cache = list(cases), cache

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        return {**self.cache.load(case), "dataset_id": case.dataset_id}

    def describe(self, index: int) -> str:
        """Case `index`'s list-file line and files (for errors, `medjax.data.pipelines.bad_examples`)."""
        case = self.cases[index]
        return f"{case.where}: {case.image} / {case.label}"


def ct_train_dataset(list_path: str, *, root: str, cache_dir: str, global_batch: int, seed: int,
                     augment: CTAugment = CTAugment(), spacing: Sequence[float] = DEFAULT_SPACING,
                     hu_range: Sequence[float] = DEFAULT_HU_RANGE, process_index: int = 0, process_count: int = 1,
                     num_epochs: int | None = None, prefetch_threads: int = 2, check_headers: bool = True,
                     on_bad_example: str = "error") -> grain.IterDataset:
    """Per-process batches of training crops from a list file (`medjax.data.pipelines.global_batches`: seeded
    shuffle per epoch, element augmentation seeded by (seed, stream position), checkpointable).
    `check_headers=False` when the caller has checked the pairs already (`medjax.data.verify`)."""
    cases = read_ct_list(list_path, root, check_headers=check_headers)
    source = CTVolumeSource(cases, CTVolumeCache(cache_dir, spacing=spacing, hu_range=hu_range))
    return global_batch_dataset(source, global_batch=global_batch, seed=seed, transform=CTTrainTransform(augment),
                                process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                                prefetch_threads=prefetch_threads, on_bad_example=on_bad_example)
