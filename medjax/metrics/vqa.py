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
