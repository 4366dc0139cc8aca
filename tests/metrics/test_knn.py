"""kNN probe (UNI: centred, L2-normalised, k = 20 majority; DINOv2: temperature-weighted) vs brute force."""
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from medjax.metrics.knn import knn_evaluate, knn_predict, nearest_neighbours


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12)) * 1.2
    y_train, y_test = rng.integers(0, 4, 90), rng.integers(0, 4, 37)
    x_train = centers[y_train] + rng.normal(size=(90, 12)) + 3.0  # an offset that centring removes
    x_test = centers[y_test] + rng.normal(size=(37, 12)) + 3.0
    return x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test


def _brute_force(x_train, y_train, x_test, k, center, voting, temperature=0.07):
    if center:
        mean = x_train.mean(0, keepdims=True)
        x_train, x_test = x_train - mean, x_test - mean
    tr = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    te = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    dist = ((te[:, None, :] - tr[None, :, :]) ** 2).sum(-1)  # Euclidean, as sklearn in UNI
    scores = np.zeros((len(te), 4))
    for i, row in enumerate(dist):
        nn = np.argsort(row, kind="stable")[:k]
        for j in nn:
            scores[i, y_train[j]] += 1.0 if voting == "majority" else np.exp(tr[j] @ te[i] / temperature)
    return scores


def test_uni_majority_matches_brute_force_and_sklearn(data):
    x_train, y_train, x_test, y_test = data
    # small chunks and query batches: exercises the running top-k merge and the padding
    pred, scores = knn_predict(x_train, y_train, x_test, k=20, query_batch=8, train_chunk=16)
    expected = _brute_force(x_train, y_train, x_test, 20, True, "majority")
    np.testing.assert_array_equal(scores, expected)
    np.testing.assert_array_equal(pred, expected.argmax(1))
    mean = x_train.mean(0, keepdims=True)
    norm = lambda a: (a - mean) / np.linalg.norm(a - mean, axis=1, keepdims=True)  # noqa: E731
    sk = KNeighborsClassifier(n_neighbors=20).fit(norm(x_train), y_train).predict(norm(x_test))
    np.testing.assert_array_equal(pred, sk)
    assert scores.sum(1).tolist() == [20.0] * len(x_test)


def test_dinov2_temperature_voting(data):
    x_train, y_train, x_test, _ = data
    pred, scores = knn_predict(x_train, y_train, x_test, k=10, center=False, voting="temperature",
                               query_batch=16, train_chunk=32)
    expected = _brute_force(x_train, y_train, x_test, 10, False, "temperature")
    np.testing.assert_allclose(scores / scores.sum(1, keepdims=True), expected / expected.sum(1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pred, expected.argmax(1))


def test_ties_keep_lower_index_and_smallest_class():
    train = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)  # three identical rows
    sims, labels = nearest_neighbours(train, np.array([2, 1, 0, 0]), np.array([[1, 0]], np.float32), 2,
                                      train_chunk=1)
    np.testing.assert_array_equal(labels, [[2, 1]])  # rows 0 and 1, in index order
    np.testing.assert_allclose(sims, [[1.0, 1.0]])
    pred, _ = knn_predict(train, np.array([2, 1, 0, 0]), np.array([[1, 0]], np.float32), k=2, center=False)
    assert pred.tolist() == [1]  # a 1-1 vote between classes 2 and 1 goes to the smaller


def test_metrics_and_errors(data):
    x_train, y_train, x_test, y_test = data
    results = knn_evaluate(x_train, y_train, x_test, y_test, k=20)
    assert set(results) == {"balanced_acc", "weighted_f1", "acc"}
    assert results["balanced_acc"] > 0.7  # well separated clusters
    with pytest.raises(ValueError, match="k = 91"):
        knn_predict(x_train, y_train, x_test, k=91)
    with pytest.raises(ValueError, match="share D"):
        knn_predict(x_train, y_train, x_test[:, :5])
