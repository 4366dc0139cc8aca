"""Evaluation of the CLIP-Driven Universal Model (Liu et al., ICCV 2023, arXiv 2301.00785): the masks of
`medjax.inference.universal_predictor` (sliding window 96^3, overlap 0.5, Gaussian weighting, sigmoid > 0.5,
the original's post-processing; original `test.py`) scored by per-organ Dice and NSD, laid out like the
paper's BTCV table (Table 2) and Medical Segmentation Decathlon table (Table 3).

Results are flat `{name: float}`: `dice/<class>`, `nsd/<class>` (mean over the cases whose dataset
annotates the class and whose ground truth holds it; the original skips empty labels), the same per
dataset as `dice/<dataset id>/<class>` when cases carry a dataset id, `dice/mean` and `nsd/mean`
(mean over the scored classes of their means, the original's "average"), and `cases`. Class keys
are the class names in snake case (`CLASS_KEYS`: "liver", "right_kidney", "liver_tumor", ...).

Chance (issue #23, `medjax.metrics.chance`): beside every Dice key `k`, `k + "_chance"` is the Dice of the
best input-blind mask, the whole evaluated volume (the foreground crop), averaged over the same cases:
2|G| / (|V| + |G|) per case (our choice; an empty mask scores 0, and any input-blind mask that is not all of
the volume does no better in expectation over where the organ lies). The tables print it beside the Dice.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from medjax.inference.universal_predictor import ALL_CLASSES, predict_masks
from medjax.metrics.chance import CHANCE_SUFFIX
from medjax.metrics.segmentation import per_class_scores
from medjax.ontology import universal_classes as templates

__all__ = ["ALL_CLASSES", "CLASS_KEYS", "btcv_table", "cases_from_cache", "evaluate_cases", "msd_table",
           "predict_masks", "universal_results_table"]  # predict_masks: re-exported from universal_predictor
CLASS_KEYS = tuple(name.lower().replace(" ", "_") for name in templates.CLASS_NAMES)

# Paper Table 2 (BTCV): column header -> class id; "Avg" is the mean of the row's organs.
BTCV_COLUMNS = (("Spleen", 1), ("R Kidney", 2), ("L Kidney", 3), ("Gall Bladder", 4), ("Esophagus", 5),
                ("Liver", 6), ("Stomach", 7), ("Aorta", 8), ("IVC/Postcava", 9), ("Veins", 10),
                ("Pancreas", 11), ("R Adrenal", 12), ("L Adrenal", 13))
BTCV_DATASET = "01"
# Paper Table 3 (MSD): task -> (dataset id, ((column, class id), ...)).
MSD_TASKS = (("Liver", "10_03", (("Organ", 6), ("Tumor", 27))),
             ("Lung", "10_06", (("Tumor", 30),)),
             ("Pancreas", "10_07", (("Organ", 11), ("Tumor", 28))),
             ("Hepatic Vessel", "10_08", (("Vessel", 15), ("Tumor", 29))),
             ("Spleen", "10_09", (("Organ", 1),)),
             ("Colon", "10_10", (("Tumor", 31),)))


def cases_from_cache(ct_cases: Iterable[Any], cache: Any) -> Iterator[dict]:
    """Evaluation cases for `evaluate_cases` from `ct_pipeline.CTCase`s through a `CTVolumeCache`
    (preprocessed, foreground-cropped volumes): {"image" (X, Y, Z) float32, "label" (X, Y, Z, 32),
    "label_mask" (32,), "dataset_id", "name"}, one case in memory at a time."""
    from medjax.data.pipelines.ct import label_channels

    for case in ct_cases:
        entry = cache.load(case)
        label, label_mask = label_channels(np.asarray(entry["organ"]), np.asarray(entry["tumour"]), case.dataset_id)
        yield {"image": np.asarray(entry["image"], np.float32), "label": label, "label_mask": label_mask,
               "dataset_id": case.dataset_id, "name": case.image}


def whole_volume_dice(label: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    """{class: Dice of predicting the whole volume} = 2|G| / (|V| + |G|) for 1-based `classes` of (X, Y, Z, C)
    channels; NaN where the class is absent (such cases are skipped, as for the model's Dice)."""
    volume = float(np.prod(label.shape[:-1]))
    out = {}
    for c in classes:
        size = float(np.count_nonzero(label[..., c - 1]))
        out[c] = 2.0 * size / (volume + size) if size > 0 else float("nan")
    return out


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def evaluate_cases(predict_fn: Callable[[np.ndarray, tuple[int, ...]], np.ndarray], cases: Iterable[dict], *,
                   spacing: Sequence[float], nsd_tolerance_mm: float | dict[int, float],
                   ignore_empty: bool = True) -> dict[str, float]:
    """Per-class Dice / NSD over `cases` (module docstring for the keys).

    A case is a dict with "image" (X, Y, Z[, 1]) float32, "label" (X, Y, Z, 32) per-class channels,
    "label_mask" (32,) bool (the classes its dataset annotates; `ct_pipeline.label_channels`) and
    optionally "dataset_id" (e.g. "01", "10_03"). `predict_fn(image, classes)` returns the bool
    (X, Y, Z, 32) post-processed masks (e.g. `predict_masks` with the model bound); only the
    annotated classes are scored.
    """
    overall: dict[int, list[tuple[float, float, float]]] = defaultdict(list)  # (Dice, NSD, chance Dice)
    by_dataset: dict[tuple[str, int], list[tuple[float, float, float]]] = defaultdict(list)
    count = 0
    for index, case in enumerate(cases):
        where = case.get("name", f"case {index}")
        for field in ("image", "label", "label_mask"):
            if field not in case:
                raise KeyError(f"{where}: evaluation case has no {field!r} (has {sorted(case)})")
        label = np.asarray(case["label"]).astype(bool)
        label_mask = np.asarray(case["label_mask"], dtype=bool)
        if label.ndim != 4 or label.shape[-1] != templates.NUM_CLASSES or label_mask.shape != (templates.NUM_CLASSES,):
            raise ValueError(f"{where}: label {label.shape} / label_mask {label_mask.shape} must be "
                             f"(X, Y, Z, {templates.NUM_CLASSES}) / ({templates.NUM_CLASSES},)")
        classes = tuple(int(c) + 1 for c in np.flatnonzero(label_mask))
        pred = np.asarray(predict_fn(case["image"], classes)).astype(bool)
        if pred.shape != label.shape:
            raise ValueError(f"{where}: prediction {pred.shape} and label {label.shape} differ in shape")
        scores = per_class_scores(pred, label, classes, spacing=spacing, tolerance_mm=nsd_tolerance_mm,
                                  ignore_empty=ignore_empty)
        chance = whole_volume_dice(label, classes)
        for c, (dice_value, nsd_value) in scores.items():
            pair = (dice_value, nsd_value, chance[c] if not math.isnan(dice_value) else float("nan"))
            overall[c].append(pair)
            if case.get("dataset_id"):
                by_dataset[(str(case["dataset_id"]), c)].append(pair)
        count += 1
    results: dict[str, float] = {}
    metrics = ("dice", "nsd", "dice" + CHANCE_SUFFIX)
    class_means = {m: [] for m in metrics}

    def put(prefix: str, pairs: list, means: dict | None) -> None:
        for i, metric in enumerate(metrics):
            mean = _nanmean([pair[i] for pair in pairs])
            if not math.isnan(mean):
                key = f"dice/{prefix}{CHANCE_SUFFIX}" if i == 2 else f"{metric}/{prefix}"
                results[key] = mean
                if means is not None:
                    means[metric].append(mean)

    for c in sorted(overall):
        put(CLASS_KEYS[c - 1], overall[c], class_means)
    for (dataset, c), pairs in sorted(by_dataset.items()):
        put(f"{dataset}/{CLASS_KEYS[c - 1]}", pairs, None)
    for metric in ("dice", "nsd"):
        results[f"{metric}/mean"] = float(np.mean(class_means[metric])) if class_means[metric] else float("nan")
    chance_means = class_means["dice" + CHANCE_SUFFIX]
    if chance_means:
        results[f"dice/mean{CHANCE_SUFFIX}"] = float(np.mean(chance_means))
    results["cases"] = float(count)
    return results


def _lookup(results: dict[str, float], metric: str, dataset: str, c: int) -> float | None:
    for key in (f"{metric}/{dataset}/{CLASS_KEYS[c - 1]}", f"{metric}/{CLASS_KEYS[c - 1]}"):
        if key in results and not math.isnan(results[key]):
            return results[key]
    return None


def _chance(results: dict[str, float], dataset: str, c: int) -> float | None:
    for key in (f"dice/{dataset}/{CLASS_KEYS[c - 1]}", f"dice/{CLASS_KEYS[c - 1]}"):
        if key in results and not math.isnan(results[key]):
            return results.get(key + CHANCE_SUFFIX)
    return None


def _cell(value: float | None, chance: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" + (f" (chance {100 * chance:.2f})" if chance is not None else "")


def _dice_cell(results: dict[str, float], metric: str, dataset: str, c: int) -> str:
    """A Dice cell with its chance level beside it (`dice/..._chance`); NSD cells as they are."""
    value = _lookup(results, metric, dataset, c)
    return _cell(value, _chance(results, dataset, c) if metric == "dice" and value is not None else None)


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _method(exp: str, label: str) -> str:
    return f"medjax {exp} ({label})" if label else f"medjax {exp}"


def btcv_table(exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
    """Dice (%) per BTCV organ and their mean (paper Table 2 layout), one row per results column;
    values from `dice/01/<organ>`, else `dice/<organ>`."""
    rows = []
    for label, results in columns:
        values = [_lookup(results, "dice", BTCV_DATASET, c) for _, c in BTCV_COLUMNS]
        chances = [_chance(results, BTCV_DATASET, c) for _, c in BTCV_COLUMNS]
        present = [v for v in values if v is not None]
        present_chance = [ch for v, ch in zip(values, chances) if v is not None and ch is not None]
        rows.append([_method(exp, label), *(_dice_cell(results, "dice", BTCV_DATASET, c) for _, c in BTCV_COLUMNS),
                     _cell(float(np.mean(present)) if present else None,
                           float(np.mean(present_chance)) if present_chance and len(present_chance) == len(present)
                           else None)])
    return _table(["Method", *(name for name, _ in BTCV_COLUMNS), "Avg"], rows)


def msd_table(exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
    """Dice and NSD (%) per MSD task and structure (paper Table 3 layout); values from
    `<metric>/<10_NN>/<class>`, else `<metric>/<class>`."""
    header = ["Method"] + [f"{task} {part} {metric}" for task, _, parts in MSD_TASKS for part, _ in parts
                           for metric in ("DSC", "NSD")]
    rows = []
    for label, results in columns:
        cells = [_dice_cell(results, metric, dataset, c) for _, dataset, parts in MSD_TASKS for _, c in parts
                 for metric in ("dice", "nsd")]
        rows.append([_method(exp, label), *cells])
    return _table(header, rows)


def _has_any(columns: list[tuple[str, dict[str, float]]], pairs: Iterable[tuple[str, int]]) -> bool:
    pairs = list(pairs)
    return any(_lookup(results, "dice", dataset, c) is not None for _, results in columns for dataset, c in pairs)


def universal_results_table(exp: str, columns: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown: the BTCV table and/or the MSD table (those with any scored structure), else one
    Dice / NSD row per scored class; `columns` is [(label, results of `evaluate_cases`), ...]."""
    parts = []
    if _has_any(columns, ((BTCV_DATASET, c) for _, c in BTCV_COLUMNS)):
        parts.append("BTCV (Dice %)\n\n" + btcv_table(exp, columns))
    if _has_any(columns, ((dataset, c) for _, dataset, ps in MSD_TASKS for _, c in ps)):
        parts.append("Medical Segmentation Decathlon (Dice / NSD %)\n\n" + msd_table(exp, columns))
    if not parts:
        scored = [c for c in ALL_CLASSES if any(f"dice/{CLASS_KEYS[c - 1]}" in r for _, r in columns)]
        header = ["Method"] + [f"{templates.CLASS_NAMES[c - 1]} {m}" for c in scored for m in ("DSC", "NSD")]
        rows = [[_method(exp, label)] + [_cell(results.get(f"{m}/{CLASS_KEYS[c - 1]}"),
                                               results.get(f"dice/{CLASS_KEYS[c - 1]}{CHANCE_SUFFIX}") if m == "dice"
                                               else None)
                                         for c in scored for m in ("dice", "nsd")]
                for label, results in columns]
        parts.append(_table(header, rows))
    return "\n\n".join(parts)
