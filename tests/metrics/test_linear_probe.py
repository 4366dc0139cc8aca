"""Linear probe (UNI: L-BFGS logistic regression, C = D x classes / 100) vs scikit-learn and UNI's torch code."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medjax.metrics.linear_probe import fit_linear_probe, linear_probe_evaluate, uni_cost

N, D, C = 120, 16, 3  # one shape for every fit here: one compile per penalty


def _blobs(seed, spread):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)) * 2.0
    y = np.arange(N) % C
    return (centers[y] + spread * rng.normal(size=(N, D))).astype(np.float32), y


def test_uni_cost():
    assert uni_cost(1024, 9) == pytest.approx(92.16)  # UNI: 1024-d features, 9 CRC-100K classes


def test_sklearn_objective_matches_sklearn():
    x, y = _blobs(0, 2.0)  # overlapping classes: a non-trivial optimum
    probe = fit_linear_probe(x, y, penalty="sklearn")
    assert probe.cost == pytest.approx(D * C / 100)
    sk = LogisticRegression(C=probe.cost, max_iter=1000, tol=1e-8).fit(x, y)
    np.testing.assert_allclose(probe.weight, sk.coef_.T, atol=2e-3)
    np.testing.assert_allclose(probe.predict_proba(x), sk.predict_proba(x), atol=1e-3)
    assert 0 < probe.iterations < 1000


def test_uni_objective_matches_unis_torch_lbfgs():
    x, y = _blobs(1, 2.0)
    probe = fit_linear_probe(x, y, penalty="uni")
    # UNI's logistic_regression.py: zero-initialised Linear, CE + (1 / C) * 0.5 * ||W||_2, LBFGS strong Wolfe.
    torch.manual_seed(0)
    layer = torch.nn.Linear(D, C)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = torch.optim.LBFGS(layer.parameters(), line_search_fn="strong_wolfe", max_iter=1000)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xt), yt) + 0.5 * layer.weight.norm(p=2) / probe.cost
        loss.backward()
        return loss

    opt.step(closure)
    assert probe.loss == pytest.approx(closure().item(), abs=1e-5)
    np.testing.assert_allclose(probe.predict_proba(x), torch.softmax(layer(xt), -1).detach().numpy(), atol=1e-3)


def test_separable_data_is_classified_perfectly():
    x, y = _blobs(2, 0.2)
    results = linear_probe_evaluate(x[:100], y[:100], x[100:], y[100:])  # 100 rows pad to the same 128 rows
    assert results["balanced_acc"] == 1.0 and results["weighted_f1"] == 1.0
    assert results["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="penalty"):
        fit_linear_probe(x, y, penalty="l1")
    with pytest.raises(ValueError, match="non-negative integers"):
        fit_linear_probe(x, y.astype(np.float32))
