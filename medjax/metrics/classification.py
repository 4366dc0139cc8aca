"""Classification metrics of the MRM transfer tasks (Yang et al., ICCV 2023, Sec. 4): AUC for
RFMiD multi-label disease classification, quadratic-weighted kappa and AUC for APTOS 2019 DR
grading, whose 5 grades are trained as a cumulative ordinal multi-label target (as in ContIG).

numpy in, Python floats (or integer arrays) out.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum (Mann-Whitney U) formula, tied scores get averaged ranks:
    AUC = (sum of positive ranks - P (P + 1) / 2) / (P N). Needs both classes present."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in size")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("roc_auc: labels must be 0/1")
    positive = labels.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positive and {n_neg} negative labels")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(labels_multi_hot: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over the columns of (N, C) multi-hot labels that contain both classes."""
    labels, scores = np.asarray(labels_multi_hot), np.asarray(scores)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"macro_auc needs (N, C) labels and scores of one shape, got {labels.shape}, {scores.shape}")
    aucs = [roc_auc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])
            if 0 < labels[:, c].sum() < labels.shape[0]]
    if not aucs:
        raise ValueError("macro_auc: no column has both positive and negative labels")
    return float(np.mean(aucs))


def _check_classes(values: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    values = np.asarray(values).ravel()
    if not np.issubdtype(values.dtype, np.integer) or values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} must be integers in [0, {num_classes}), got {values.dtype} values "
                         f"{np.unique(values)[:10]}")
    return values


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights w_ij = (i - j)^2 / (K - 1)^2:
    kappa = 1 - sum(w O) / sum(w E), O the confusion matrix, E = outer(row sums, col sums) / N.
    When sum(w E) = 0 (both raters use one and the same class) agreement is perfect: 1.0."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    y_true = _check_classes(y_true, num_classes, "y_true")
    y_pred = _check_classes(y_pred, num_classes, "y_pred")
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be non-empty and of one size")
    observed = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(observed, (y_true, y_pred), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / y_true.size
    grid = np.arange(num_classes)
    weights = (grid[:, None] - grid[None, :]) ** 2 / (num_classes - 1) ** 2
    denominator = (weights * expected).sum()
    if denominator == 0:
        return 1.0
    return float(1.0 - (weights * observed).sum() / denominator)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of equal entries."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be non-empty and of one size")
    return float(np.mean(y_true == y_pred))


def grade_to_ordinal(grades: np.ndarray, num_classes: int) -> np.ndarray:
    """Cumulative ordinal target: grade g of K classes -> [1]*g + [0]*(K-1-g), float32 (N, K-1)."""
    grades = _check_classes(grades, num_classes, "grades")
    return (np.arange(num_classes - 1)[None, :] < grades[:, None]).astype(np.float32)


def ordinal_to_grade(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Grade from cumulative ordinal outputs (N, K-1): the number of leading outputs > threshold
    (an output after the first negative does not count). Returns int32 (N,)."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"ordinal outputs must be (N, K-1), got shape {probs.shape}")
    return np.cumprod(probs > threshold, axis=1).sum(axis=1).astype(np.int32)


def contig_grade_targets(grades, num_classes: int):
    """ContIG's APTOS target: grade g of K classes -> K cumulative outputs [1]*(g+1) + [0]*(K-1-g) (the
    first output is always on). float32 (N, K). numpy grades are checked (integers in [0, K)); a jax array (the
    jitted training loss, medjax.tasks.fundus_classification, traces this same function) is used as given."""
    import jax

    if isinstance(grades, jax.Array):
        import jax.numpy as jnp

        return (jnp.arange(num_classes)[None, :] <= grades[:, None]).astype(jnp.float32)
    grades = _check_classes(grades, num_classes, "grades")
    return (np.arange(num_classes)[None, :] <= grades[:, None]).astype(np.float32)


def contig_grade(probs, threshold: float = 0.5):
    """ContIG's APTOS decoding over the K cumulative outputs: (probs > threshold).sum() - 1, every output
    counted (not only the leading ones). A row with every output off would give -1: our choice is grade 0
    (the first output is trained always on). numpy or jax arrays (N, K) -> integer (N,)."""
    return ((probs > threshold).sum(axis=-1) - 1).clip(0, None)
