"""Retrieval recall@K and VQA open/closed accuracy against hand-worked cases."""
import numpy as np
import pytest

from medjax.metrics.retrieval import retrieval_recall
from medjax.metrics.vqa import question_only_accuracy, vqa_accuracy


def test_recall_square_hand_case():
    # image 0 ranks texts [0, 1, 2]; image 1 ranks [2, 1, 0]; image 2 ranks [0, 2, 1]
    scores = np.array([[0.9, 0.5, 0.1],
                       [0.1, 0.5, 0.8],
                       [0.7, 0.2, 0.3]])
    r = retrieval_recall(scores, ks=(1, 2))
    # image->text: image 0 hit@1; image 1 own text (1) at rank 2; image 2 own text (2) at rank 2
    assert r["tr_r1"] == pytest.approx(100 / 3) and r["tr_r2"] == pytest.approx(100.0)
    # text->image: text 0 ranks images [0, 2, 1] hit@1; text 1 ranks [0, 1, 2] (0.5 tie -> lower index) rank 2;
    # text 2 ranks [1, 2, 0] rank 2
    assert r["ir_r1"] == pytest.approx(100 / 3) and r["ir_r2"] == pytest.approx(100.0)
    assert r["rsum"] == pytest.approx(2 * 100 / 3 + 200.0)


def test_recall_several_texts_per_image():
    # 2 images, 3 texts: texts 0, 1 describe image 0, text 2 image 1
    scores = np.array([[0.1, 0.8, 0.9],
                       [0.2, 0.1, 0.3]])
    r = retrieval_recall(scores, text_image=np.array([0, 0, 1]), ks=(1, 2))
    # image 0's top text is 2 (wrong), top-2 holds text 1 (right); image 1's top text is 2 (right)
    assert r["tr_r1"] == 50.0 and r["tr_r2"] == 100.0
    # text 0: image 1 (0.2) above image 0 (0.1) -> miss@1; text 1: image 0; text 2: image 0 (0.9) -> miss@1
    assert r["ir_r1"] == pytest.approx(100 / 3) and r["ir_r2"] == 100.0


def test_recall_k_larger_than_pool_and_errors():
    r = retrieval_recall(np.eye(3), ks=(1, 10))
    assert r["tr_r1"] == r["ir_r1"] == r["tr_r10"] == 100.0
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="image indices"):
        retrieval_recall(np.zeros((2, 2)), text_image=np.array([0, 2]))


def test_vqa_accuracy_hand_case():
    logits = np.array([[2.0, 1.0, 0.0],   # predicts 0, answer 0, closed -> right
                       [0.0, 3.0, 1.0],   # predicts 1, answer 2, closed -> wrong
                       [0.0, 0.0, 5.0],   # predicts 2, answer 2, open -> right
                       [1.0, 0.0, 0.0]])  # predicts 0, answer 1, open -> wrong
    answers = np.array([0, 2, 2, 1])
    types = np.array([0, 0, 1, 1])
    r = vqa_accuracy(logits, answers, types)
    assert r == {"overall": 50.0, "closed": 50.0, "open": 50.0, "num_closed": 2.0, "num_open": 2.0}
    soft = np.zeros((4, 3))
    soft[np.arange(4), answers] = 1.0
    soft[1, 1] = 0.3  # a soft score at the predicted answer counts as 0.3 (VQA-style)
    r = vqa_accuracy(logits, soft, types)
    assert r["closed"] == pytest.approx(65.0) and r["overall"] == pytest.approx(100 * 2.3 / 4)


def test_vqa_accuracy_missing_type_and_errors():
    r = vqa_accuracy(np.array([[1.0, 0.0]]), np.array([0]), np.array([0]))
    assert r["closed"] == 100.0 and np.isnan(r["open"]) and r["num_open"] == 0.0
    with pytest.raises(ValueError, match="answer_types"):
        vqa_accuracy(np.array([[1.0, 0.0]]), np.array([0]), np.array([2]))
    with pytest.raises(ValueError, match="integer answers"):
        vqa_accuracy(np.array([[1.0, 0.0]]), np.array([5]), np.array([0]))


def test_question_only_baseline_hand_case():
    eye = np.eye(4)  # answers: 0 yes, 1 no, 2 red, 3 blue
    train_q = ["Is there a circle?", "Is there a circle?", "Is there a circle?", "What colour?", "What colour?", "Count?"]
    train_t = eye[[1, 1, 0, 3, 3, 2]]
    train_k = np.array([0, 0, 0, 1, 1, 1])
    # seen texts take their training majority (no, blue); an unseen open text takes the best open answer (blue)
    r = question_only_accuracy(train_q, train_t, train_k, ["Is there a circle?", "What colour?", "What colour?", "New?"],
                               eye[[1, 2, 3, 3]], np.array([0, 1, 1, 1]))
    assert (r["closed"], r["open"], r["overall"]) == (100.0, pytest.approx(200 / 3), 75.0)
    with pytest.raises(ValueError, match="differ in length"):
        question_only_accuracy(train_q, train_t, train_k[:2], ["x"], eye[[0]], np.array([0]))
