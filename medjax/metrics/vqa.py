"""Medical VQA accuracy, open / closed / overall (PTUnifier, Chen et al., ICCV 2023, VQA table; the
original's `VQARADScore`): the predicted answer is the arg-max over the closed answer vocabulary,
scored by the target's soft score at that answer (1 for the single normalised answer of VQA-RAD,
SLAKE and MedVQA-2019), averaged over all questions and separately over closed (yes/no) and open
questions. Values in %.
"""
from __future__ import annotations

import numpy as np

CLOSED, OPEN = 0, 1  # the originals' answer_type codes


def vqa_accuracy(logits: np.ndarray, targets: np.ndarray, answer_types: np.ndarray) -> dict[str, float]:
    """{"overall", "closed", "open", "num_closed", "num_open"} from (N, C) logits (or probabilities),
    (N, C) target scores (one-hot for single answers) or (N,) integer answers, and (N,) answer types
    (0 closed, 1 open). An answer type with no question gets NaN."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (N, C) with N > 0, got {logits.shape}")
    n, c = logits.shape
    targets = np.asarray(targets)
    if targets.ndim == 1:
        if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= c:
            raise ValueError(f"integer answers must lie in [0, {c}), got {targets}")
        targets = np.eye(c, dtype=np.float64)[targets]
    if targets.shape != (n, c):
        raise ValueError(f"targets {targets.shape} must match logits {logits.shape}")
    types = np.asarray(answer_types).astype(np.int64)
    if types.shape != (n,) or not np.isin(types, (CLOSED, OPEN)).all():
        raise ValueError(f"answer_types must be (N,) of 0 (closed) / 1 (open), got {types}")
    scores = targets[np.arange(n), logits.argmax(-1)].astype(np.float64)

    def mean(mask):
        return 100.0 * float(scores[mask].mean()) if mask.any() else float("nan")

    return {"overall": mean(np.ones(n, bool)), "closed": mean(types == CLOSED), "open": mean(types == OPEN),
            "num_closed": float((types == CLOSED).sum()), "num_open": float((types == OPEN).sum())}


def question_only_accuracy(train_questions: list[str], train_targets: np.ndarray, train_types: np.ndarray,
                           questions: list[str], targets: np.ndarray, answer_types: np.ndarray) -> dict[str, float]:
    """`vqa_accuracy` of an image-blind answerer fitted on the training split (our baseline, issue #23): for each
    question text the answer of highest total training score among the training questions with that text; for a
    text never seen in training, the best answer of its answer type over the training questions (the type known,
    as `medjax.metrics.chance.vqa_chance`). A model that beats it reads the image."""
    train_targets, targets = np.asarray(train_targets, np.float64), np.asarray(targets, np.float64)
    train_types, types = np.asarray(train_types).astype(np.int64), np.asarray(answer_types).astype(np.int64)
    if not len(train_questions) == len(train_targets) == len(train_types) or not len(questions) == len(targets) == len(types):
        raise ValueError("question_only_accuracy: the questions, targets and answer types of a split differ in length")
    if train_targets.ndim != 2 or targets.ndim != 2 or train_targets.shape[1] != targets.shape[1]:
        raise ValueError(f"question_only_accuracy: targets must be (N, C) over one vocabulary, got "
                         f"{train_targets.shape} and {targets.shape}")
    per_question: dict[str, np.ndarray] = {}
    for q, t in zip(train_questions, train_targets):
        per_question[q] = per_question.get(q, 0.0) + t
    overall = int(train_targets.sum(0).argmax())
    per_type = {kind: int(train_targets[train_types == kind].sum(0).argmax()) if (train_types == kind).any() else overall
                for kind in (CLOSED, OPEN)}
    picks = [int(per_question[q].argmax()) if q in per_question else per_type[int(k)] for q, k in zip(questions, types)]
    return vqa_accuracy(np.eye(targets.shape[1])[np.asarray(picks, np.int64)], targets, types)
