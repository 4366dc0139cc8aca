"""Multi-class metrics of UNI's evaluations (Chen et al., Nat. Med. 2024; `uni/downstream/eval_patch_features/
metrics.py`, which calls scikit-learn): balanced accuracy (the headline metric of every UNI task),
support-weighted F1, and the one-vs-one macro AUC (Hand & Till 2001) UNI reports for multi-class probes.

numpy in, Python floats out; the definitions are scikit-learn's, including its edge cases (noted per function).
"""
from __future__ import annotations

import itertools

import numpy as np

from medjax.metrics.classification import roc_auc


def _labels_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be non-empty and of one size")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
            raise ValueError(f"{name} must be non-negative integer class indices, got {values.dtype} "
                             f"values {np.unique(values)[:10]}")
    return y_true, y_pred


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted; K = num_classes or 1 + the largest label."""
    y_true, y_pred = _labels_pair(y_true, y_pred)
    k = int(max(y_true.max(), y_pred.max())) + 1 if num_classes is None else int(num_classes)
    if max(y_true.max(), y_pred.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k}), got up to {max(y_true.max(), y_pred.max())}")
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y_true (sklearn `balanced_accuracy_score`:
    a class only predicted, never true, does not count)."""
    counts = confusion_matrix(y_true, y_pred)
    support = counts.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(counts)[present] / support[present]))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Per-class F1 = 2 TP / (2 TP + FP + FN) (0 when undefined), averaged with weights = true support
    (sklearn `f1_score(average="weighted")`, UNI's `classification_report[...]["weighted avg"]`)."""
    counts = confusion_matrix(y_true, y_pred)
    tp = np.diag(counts).astype(np.float64)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    support = counts.sum(axis=1)
    return float((f1 * support).sum() / support.sum())


def multiclass_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC from class probabilities (N, K). K = 2: the binary AUC of probs[:, 1]. K > 2: the
    one-vs-one macro AUC of Hand & Till (sklearn `roc_auc_score(multi_class="ovo", average="macro")`, as
    UNI reports): the mean over class pairs (i, j) of [AUC_i|j + AUC_j|i] / 2, AUC_i|j scoring probs[:, i]
    on the samples of classes i and j. Every class in 0..K-1 must occur in y_true."""
    y_true = np.asarray(y_true).ravel()
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.size or probs.shape[1] < 2:
        raise ValueError(f"probs must be (N, K >= 2) with N = {y_true.size} labels, got {probs.shape}")
    k = probs.shape[1]
    missing = sorted(set(range(k)) - set(np.unique(y_true).tolist()))
    if missing:
        raise ValueError(f"multiclass_auc: class(es) {missing} of {k} never occur in y_true")
    if k == 2:
        return roc_auc(y_true == 1, probs[:, 1])
    pairs = []
    for i, j in itertools.combinations(range(k), 2):
        keep = (y_true == i) | (y_true == j)
        pairs.append(0.5 * (roc_auc(y_true[keep] == i, probs[keep, i]) + roc_auc(y_true[keep] == j, probs[keep, j])))
    return float(np.mean(pairs))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """{"balanced_acc", "weighted_f1", "acc"}: what UNI reports for a tile- or slide-level classifier."""
    y_true, y_pred = _labels_pair(y_true, y_pred)
    return {"balanced_acc": balanced_accuracy(y_true, y_pred), "weighted_f1": weighted_f1(y_true, y_pred),
            "acc": float(np.mean(y_true == y_pred))}
