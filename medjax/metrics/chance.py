"""What a metric reads for a model that knows nothing of the input: the number printed beside each result
(`81.00 (chance 50.00)`), so a demo's table says at a glance whether the method learnt (issue #23).

A result dict holds a metric `m` and, where defined, `m + CHANCE_SUFFIX`: the score of the best input-blind
predictor under that metric's usual convention (our choice, stated per function)."""
from __future__ import annotations

import numpy as np

CHANCE_SUFFIX = "_chance"
AUC_CHANCE = 0.5  # any constant or random score
KAPPA_CHANCE = 0.0  # agreement expected by chance is what kappa subtracts


def majority_fraction(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent label of `labels` (the evaluated split)."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


def balanced_accuracy_chance(labels: np.ndarray) -> float:
    """Balanced accuracy (mean recall over the classes present) of any constant prediction: 1 / classes."""
    return 1.0 / max(len(np.unique(np.asarray(labels))), 1)


def weighted_f1_chance(labels: np.ndarray) -> float:
    """Support-weighted F1 of always predicting the majority class (fraction p): p * 2p / (1 + p)."""
    p = majority_fraction(labels)
    return p * 2.0 * p / (1.0 + p) if p > 0 else 0.0


def recall_at_k_chance(k: int, candidates: int) -> float:
    """Recall@k of a random ranking with one match among `candidates`."""
    return min(k, candidates) / candidates if candidates else 0.0


def multiple_choice_chance(choice_counts) -> float:
    """Accuracy of a uniformly random pick among each question's choices: the mean of 1 / choices (our choice:
    PathQABench-style questions shuffle their options, so no letter is favoured)."""
    counts = np.asarray(choice_counts, np.float64)
    return float(np.mean(1.0 / counts)) if counts.size else 0.0


def vqa_chance(targets: np.ndarray, answer_types: np.ndarray, num_answers: int) -> dict[str, float]:
    """`{overall,closed,open}_chance` in percent (as `medjax.metrics.vqa.vqa_accuracy`): the best single answer
    per answer type, given whatever the image (our choice: the question's type, closed or open, is known)."""
    targets, types = np.asarray(targets), np.asarray(answer_types).astype(np.int64)
    if targets.ndim == 1:
        targets = np.eye(num_answers, dtype=np.float64)[targets]
    out, hits = {}, np.zeros(len(types))
    for name, kind in (("closed", 0), ("open", 1)):
        mask = types == kind
        if mask.any():
            best = targets[mask].sum(0).argmax()
            hits[mask] = targets[mask, best]
        out[f"{name}_chance"] = 100.0 * float(hits[mask].mean()) if mask.any() else float("nan")
    out["overall_chance"] = 100.0 * float(hits.mean()) if len(hits) else float("nan")
    return out


def fixed_mask_dice_chance(masks: np.ndarray) -> float:
    """Pooled Dice (`medjax.metrics.segmentation.pooled_dice`) of the best input-blind segmenter: one fixed binary
    mask M drawn on every image, chosen with the split's own masks (our choice, like `majority_fraction`). With
    c_p = the number of the n images whose pixel p is foreground and G = sum_p c_p, Dice(M) = 2 sum_{p in M} c_p /
    (n |M| + G); for |M| = k the best M is the k most often foreground pixels, and the best k is taken. (An
    all-foreground mask is k = every pixel.) NaN when no image has foreground. masks: (n, H, W) 0/1."""
    masks = np.asarray(masks, np.float64)
    counts = np.sort((masks > 0.5).reshape(len(masks), -1).sum(axis=0))[::-1]
    total = counts.sum()
    if total == 0:
        return float("nan")
    k = np.arange(1, counts.size + 1)
    return float(np.max(2.0 * np.cumsum(counts) / (len(masks) * k + total)))
