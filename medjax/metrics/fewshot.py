"""Few-shot evaluation of frozen features as UNI reports it (Chen et al., Nat. Med. 2024, "few-shot ROI
classification"; mahmoodlab/UNI `eval_fewshot`): SimpleShot (Wang et al., arXiv 1911.04623) with CL2N features, over
repeated seeded draws of k labelled examples per class, and a bootstrap 95% confidence interval.

- SimpleShot: features centred by the mean of the support set, L2-normalised (CL2N); each class's prototype the
  mean of its support features; a query takes the class of the nearest prototype (Euclidean).
- `fewshot_support(labels, shots, repeats, seed)`: `repeats` draws of `shots` train rows per class without
  replacement (classes with fewer rows than `shots` are skipped for that shot count), reproducible by seed.
- `bootstrap_ci`: the 2.5 / 97.5 percentiles of a metric over `samples` resamplings of the test rows with
  replacement (seeded).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from medjax.metrics.multiclass import balanced_accuracy

UNI_SHOTS = (1, 2, 4, 8, 16, 32)


def simpleshot_predict(support: np.ndarray, support_labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """SimpleShot CL2N nearest-prototype labels of `queries` (module doc)."""
    support = np.asarray(support, np.float64)
    mean = support.mean(axis=0, keepdims=True)

    def cl2n(x):
        x = np.asarray(x, np.float64) - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    s, q = cl2n(support), cl2n(queries)
    classes = np.unique(support_labels)
    prototypes = np.stack([s[support_labels == c].mean(axis=0) for c in classes])
    distances = ((q[:, None, :] - prototypes[None]) ** 2).sum(-1)
    return classes[distances.argmin(axis=1)]


def fewshot_support(labels: np.ndarray, shots: int, repeats: int, seed: int) -> list[np.ndarray]:
    """`repeats` index arrays of `shots` rows per class (module doc), the same for the same seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, shots])
    classes = [c for c in np.unique(labels) if np.count_nonzero(labels == c) >= shots]
    return [np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes])
            for _ in range(repeats)]


def fewshot_evaluate(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, *, shots: Sequence[int] = UNI_SHOTS, repeats: int = 100,
                     seed: int = 0) -> dict[str, float]:
    """Per shot count k (those every class can supply): "{k}shot/balanced_acc" (mean over repeats) and
    "{k}shot/balanced_acc_std" of SimpleShot on the whole test set."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    smallest = int(np.unique(train_labels, return_counts=True)[1].min()) if train_labels.size else 0
    out = {}
    for k in shots:
        if k > smallest:
            continue
        scores = [balanced_accuracy(test_labels, simpleshot_predict(train_features[rows], train_labels[rows],
                                                                    test_features))
                  for rows in fewshot_support(train_labels, k, repeats, seed)]
        out[f"{k}shot/balanced_acc"] = float(np.mean(scores))
        out[f"{k}shot/balanced_acc_std"] = float(np.std(scores))
    return out


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float] =
                 balanced_accuracy, *, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(low, high): the 95% percentile bootstrap interval of `metric` over resampled test rows."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        rows = rng.integers(0, len(y_true), len(y_true))
        values.append(metric(y_true[rows], y_pred[rows]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
