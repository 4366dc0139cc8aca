"""UNI's slide-level protocol (medjax.tasks.uni_slide_classification): ABMIL trained one slide per step learns
a toy bag task, and cross-validated slide metrics."""
import ml_collections
import numpy as np
import pytest

from medjax.models.abmil import GatedABMIL
from medjax.tasks.uni_eval import uni_eval_config
from medjax.tasks.uni_slide_classification import predict_abmil, slide_level_eval, train_abmil

MODEL = GatedABMIL(num_classes=2, hidden_dim=32, attention_dim=16, dropout=0.1)
D = 16


def key_instance_bags(count: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """A bag is positive (odd index) when it holds two 'key' instances (shifted features) among noise instances."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for s in range(count):
        n = int(rng.integers(5, 40))
        x = rng.normal(size=(n, D)).astype(np.float32)
        keys = rng.choice(n, 2, replace=False)
        if s % 2:
            x[keys, :4] += 3.0
        bags.append(x)
        labels.append(s % 2)
    return bags, np.array(labels)


def test_learns_a_key_instance_task():
    bags, labels = key_instance_bags(48)
    params = train_abmil(MODEL, bags[:32], labels[:32], epochs=20, lr=3e-3, seed=0)
    probs, attention = predict_abmil(MODEL, params, bags[32:])
    assert probs.shape == (16, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == labels[32:]).mean() >= 0.9
    # attention concentrates on the key instances of positive bags
    for i in range(1, 16, 2):
        assert attention[i].shape == (len(bags[32 + i]),)
        assert np.sort(attention[i])[-2:].sum() > 0.5
    with pytest.raises(ValueError, match="slide labels"):
        train_abmil(MODEL, bags[:2], [0, 2], epochs=1)


def _settings(**abmil) -> ml_collections.ConfigDict:
    settings = uni_eval_config()
    settings.abmil.update(dict(hidden_dim=32, attention_dim=16, dropout=0.1, lr=3e-3, epochs=10, folds=2) | abmil)
    return settings


def test_slide_level_eval_cross_validates_or_uses_the_split():
    bags, labels = key_instance_bags(24, seed=1)
    pooled = slide_level_eval(bags, labels, None, _settings())
    assert pooled["abmil/slides"] == 24.0  # every slide held out once over the 2 folds
    assert pooled["abmil/balanced_acc"] >= 0.8 and pooled["abmil/auc"] >= 0.8
    test = np.arange(24) >= 16
    split = slide_level_eval(bags, labels, test, _settings())
    assert split["abmil/slides"] == 8.0
    assert split["abmil/balanced_acc"] >= 0.75  # trained on the first 16 slides only
    with pytest.raises(ValueError, match="bags.csv: ABMIL cross-validation needs >= 2 slides of every class"):
        slide_level_eval(bags[:3], labels[:3], None, _settings(), where="bags.csv")


def test_ordinal_slide_labels_add_quadratic_kappa_equal_to_sklearns():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(2)
    bags, labels = [], []
    for s in range(18):  # three ordered grades: 0, 2 or 4 shifted key instances
        grade = s % 3
        x = rng.normal(size=(int(rng.integers(6, 20)), D)).astype(np.float32)
        x[: 2 * grade, :4] += 3.0
        bags.append(x)
        labels.append(grade)
    labels = np.array(labels)
    test = np.arange(18) >= 12
    settings = _settings(ordinal=True)
    results = slide_level_eval(bags, labels, test, settings)
    cfg = settings.abmil  # the same training, deterministic: its held-out predictions
    model = GatedABMIL(3, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
    length = -(-max(len(b) for b in bags) // 64) * 64
    params = train_abmil(model, [bags[i] for i in np.flatnonzero(~test)], labels[~test], epochs=cfg.epochs, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, seed=cfg.seed, length=length)
    probs, _ = predict_abmil(model, params, [bags[i] for i in np.flatnonzero(test)], length=length)
    expected = cohen_kappa_score(labels[test], probs.argmax(1), weights="quadratic")
    assert results["abmil/quadratic_kappa"] == pytest.approx(expected, abs=1e-9)
    assert "abmil/quadratic_kappa" not in slide_level_eval(bags, labels, test, _settings())
