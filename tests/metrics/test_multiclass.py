"""Balanced accuracy, weighted F1 and one-vs-one AUC against scikit-learn (what UNI's metrics.py calls)."""
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from medjax.metrics.multiclass import (balanced_accuracy, classification_metrics, confusion_matrix, multiclass_auc,
                                       weighted_f1)


def test_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    # recalls 2/3, 1/2, 1 -> mean 13/18
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(13 / 18)
    # F1: class 0: 2*2/(4+0+1)=0.8; class 1: 2/(2+1+1)=0.5; class 2: 2/(2+1+0)=2/3; supports 3, 2, 1
    assert weighted_f1(y_true, y_pred) == pytest.approx((3 * 0.8 + 2 * 0.5 + 2 / 3) / 6)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert classification_metrics(y_true, y_pred)["acc"] == pytest.approx(4 / 6)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_matches_sklearn_with_absent_classes():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, 200))  # class 4 only predicted
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert weighted_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def test_auc_matches_sklearn_ovo_and_binary():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert multiclass_auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovo", average="macro"))
    yb = (y == 1).astype(int)
    pb = np.stack([1 - probs[:, 1], probs[:, 1]], 1)
    assert multiclass_auc(yb, pb) == pytest.approx(roc_auc_score(yb, probs[:, 1]))
    with pytest.raises(ValueError, match="never occur"):
        multiclass_auc(np.zeros(5, int), np.full((5, 2), 0.5))
