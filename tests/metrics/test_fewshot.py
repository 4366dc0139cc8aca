"""SimpleShot few-shot (UNI's eval_fewshot), its seeded support draws, and the bootstrap CI."""
import numpy as np
from sklearn.metrics import balanced_accuracy_score

from medjax.metrics.fewshot import bootstrap_ci, fewshot_evaluate, fewshot_support, simpleshot_predict


def test_simpleshot_is_cl2n_nearest_prototype():
    support = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = np.array([0, 0, 1, 1])
    # mean (1, 1.5); CL2N: (0, -1), (1, -0.6)/n, (-1, 0.2)/n, (-1, 1)/n -> prototypes to the right / upper left
    queries = np.array([[5.0, 0.0], [0.0, 9.0], [1.2, 1.4]])
    np.testing.assert_array_equal(simpleshot_predict(support, labels, queries), [0, 1, 0])
    # invariant to a shift and a scale of every feature (centred and normalised)
    np.testing.assert_array_equal(simpleshot_predict(3 * support + 7, labels, 3 * queries + 7), [0, 1, 0])


def test_support_draws_are_deterministic_by_seed_and_per_class():
    labels = np.repeat([0, 1, 2], [10, 5, 3])
    draws = fewshot_support(labels, 4, repeats=5, seed=0)
    again = fewshot_support(labels, 4, repeats=5, seed=0)
    assert all((a == b).all() for a, b in zip(draws, again))
    assert any((a != b).any() for a, b in zip(draws, fewshot_support(labels, 4, repeats=5, seed=1)))
    for rows in draws:  # 4 distinct rows of classes 0 and 1; class 2 has only 3
        assert len(set(rows.tolist())) == 8 and np.bincount(labels[rows], minlength=3).tolist() == [4, 4, 0]


def test_fewshot_evaluate_on_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    train_labels = np.repeat([0, 1, 2], 40)
    test_labels = np.repeat([0, 1, 2], 20)
    train = centres[train_labels] + rng.normal(size=(120, 8))
    test = centres[test_labels] + rng.normal(size=(60, 8))
    results = fewshot_evaluate(train, train_labels, test, test_labels, shots=(1, 4, 32, 64), repeats=10, seed=0)
    assert sorted(results) == ["1shot/balanced_acc", "1shot/balanced_acc_std", "32shot/balanced_acc",
                               "32shot/balanced_acc_std", "4shot/balanced_acc", "4shot/balanced_acc_std"]  # 64 > 40
    assert results["32shot/balanced_acc"] >= results["1shot/balanced_acc"] - 1e-9
    assert results["32shot/balanced_acc"] > 0.95 and results["32shot/balanced_acc_std"] < 0.05
    assert fewshot_evaluate(train, train_labels, test, test_labels, shots=(4,), repeats=10, seed=0)[
        "4shot/balanced_acc"] == results["4shot/balanced_acc"]


def test_bootstrap_ci_is_the_percentile_interval():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, 200))
    low, high = bootstrap_ci(y_true, y_pred, samples=200, seed=3)
    draws = np.random.default_rng(3)
    values = []
    for _ in range(200):
        rows = draws.integers(0, 200, 200)
        values.append(balanced_accuracy_score(y_true[rows], y_pred[rows]))
    np.testing.assert_allclose((low, high), np.percentile(values, [2.5, 97.5]), atol=1e-12)
    assert low < balanced_accuracy_score(y_true, y_pred) < high
