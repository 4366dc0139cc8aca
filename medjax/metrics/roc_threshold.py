"""Binary metrics at the ROC point nearest the top-left corner, the CT-RATE zero-shot protocol of fVLM and
ViSD-Boost (and CT-CLIP): AUC; the threshold minimising (1 - TPR)^2 + FPR^2; then accuracy, sensitivity,
specificity, weighted F1 and (binary) precision at that threshold (score >= threshold = positive)."""
from __future__ import annotations

import numpy as np

from medjax.metrics.classification import roc_auc
from medjax.metrics.multiclass import weighted_f1


def top_left_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold of the ROC point nearest (FPR 0, TPR 1); ties: the highest threshold."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if not positives or not negatives:
        raise ValueError("top_left_threshold: labels need both classes")
    best, best_distance = np.inf, np.inf
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        tpr = (predicted & labels).sum() / positives
        fpr = (predicted & ~labels).sum() / negatives
        distance = (1 - tpr) ** 2 + fpr ** 2
        if distance < best_distance - 1e-12:
            best, best_distance = float(threshold), distance
    return best


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """{"auc", "accuracy", "sensitivity", "specificity", "weighted_f1", "precision"} of one label."""
    labels = np.asarray(labels).astype(bool)
    threshold = top_left_threshold(labels, scores)
    predicted = np.asarray(scores) >= threshold
    tp, fp = (predicted & labels).sum(), (predicted & ~labels).sum()
    tn, fn = (~predicted & ~labels).sum(), (~predicted & labels).sum()
    return {"auc": float(roc_auc(labels.astype(np.float32), np.asarray(scores, np.float64))),
            "accuracy": float((tp + tn) / len(labels)), "sensitivity": float(tp / max(tp + fn, 1)),
            "specificity": float(tn / max(tn + fp, 1)),
            "weighted_f1": float(weighted_f1(labels.astype(np.int64), predicted.astype(np.int64))),
            "precision": float(tp / max(tp + fp, 1))}
