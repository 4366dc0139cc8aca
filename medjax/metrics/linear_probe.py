"""Linear probe of frozen features: multinomial logistic regression fit by L-BFGS (UNI, Chen et al., Nat. Med.
2024, "ROI-level tasks", following CLIP's linear-probe protocol; `uni/downstream/eval_patch_features/
linear_probe.py` and `logistic_regression.py`).

UNI's protocol, as its released code runs it:
- features as extracted (no standardisation, no normalisation);
- a Linear(D, C) layer with bias, initialised at zero, C = the number of classes in the train set;
- the cost C_reg = D * C / 100 (the paper's "lambda = 100 / (M C)" with M the embedding dimension);
- objective (`penalty="uni"`): mean cross-entropy + (1 / C_reg) * 0.5 * ||W||_2, the Frobenius norm of the
  weight (not squared; the bias is not penalised), which is what `LogisticRegression.compute_loss` computes;
- torch L-BFGS with a strong-Wolfe line search, at most 1000 iterations, history 100, stopping when
  max |grad| <= 1e-7 or the loss changes by less than 1e-9.
`penalty="sklearn"` is scikit-learn's `LogisticRegression(C=C_reg)` objective instead (UNI's `use_sklearn=True`):
mean cross-entropy + ||W||_F^2 / (2 C_reg N), bias unpenalised; its minimiser is sklearn's.

Implemented with optax's L-BFGS (zoom line search = strong Wolfe conditions) inside one jitted
`lax.while_loop`; full-batch over the train features, padded with zero-weight rows to a few bucket sizes
(`padded_rows`) so that the solver compiles once per bucket.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.metrics.multiclass import classification_metrics, multiclass_auc

PENALTIES = ("uni", "sklearn")
MAX_ITER = 1000  # UNI / CLIP: 1000 L-BFGS iterations
HISTORY = 100  # torch.optim.LBFGS history_size default, which UNI uses
GRAD_TOL = 1e-7  # torch.optim.LBFGS tolerance_grad
CHANGE_TOL = 1e-9  # torch.optim.LBFGS tolerance_change


def uni_cost(feature_dim: int, num_classes: int) -> float:
    """UNI's inverse regularisation strength C = D * C / 100 (`train_linear_probe`)."""
    return feature_dim * num_classes / 100.0


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: logits = features @ weight + bias; weight (D, C), bias (C,)."""

    weight: np.ndarray
    bias: np.ndarray
    cost: float
    iterations: int
    loss: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = np.asarray(features, np.float32) @ self.weight + self.bias
        logits = logits - logits.max(axis=-1, keepdims=True)
        return np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predict_proba(features).argmax(axis=1).astype(np.int32)


def _safe_norm(w: jax.Array) -> jax.Array:
    """||w||_F with gradient 0 at w = 0 (torch's subgradient there; the probe starts at w = 0)."""
    squared = jnp.sum(w * w)
    nonzero = squared > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def probe_objective(params: dict, features: jax.Array, labels: jax.Array, weights: jax.Array, cost: float,
                    penalty: str) -> jax.Array:
    """The regularised mean cross-entropy (module doc) of params {"weight" (D, C), "bias" (C,)} over the rows
    with weight 1 (rows of weight 0 are padding)."""
    logits = features @ params["weight"] + params["bias"]
    n = jnp.sum(weights)
    ce = jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(logits, labels)) / n
    if penalty == "uni":
        return ce + 0.5 * _safe_norm(params["weight"]) / cost
    return ce + jnp.sum(params["weight"] ** 2) / (2.0 * cost * n)


def padded_rows(n: int) -> int:
    """Rows after padding: the next power of two (at least 64) up to 4096, then a multiple of 4096; so
    train sets of similar size share one compiled solver."""
    if n <= 4096:
        return max(64, 1 << (n - 1).bit_length())
    return -(-n // 4096) * 4096


@functools.partial(jax.jit, static_argnames=("num_classes", "penalty", "max_iter", "history"))
def _fit(features, labels, weights, cost, *, num_classes, penalty, max_iter, history):
    params = {"weight": jnp.zeros((features.shape[1], num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    objective = functools.partial(probe_objective, features=features, labels=labels, weights=weights, cost=cost,
                                  penalty=penalty)
    solver = optax.lbfgs(memory_size=history,
                         linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=25, initial_guess_strategy="one"))
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state, _, _, it = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        params = optax.apply_updates(params, updates)
        new_value = optax.tree.get(state, "value")
        return params, state, value, new_value, it + 1

    def keep_going(carry):
        _, state, old, new, it = carry
        grad = optax.tree.get(state, "grad")
        grad_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
        converged = (it > 0) & ((grad_max <= GRAD_TOL) | (jnp.abs(new - old) < CHANGE_TOL))
        return (it < max_iter) & ~converged

    state = solver.init(params)
    init = (params, state, jnp.inf, jnp.inf, jnp.array(0, jnp.int32))
    params, state, _, _, iterations = jax.lax.while_loop(keep_going, step, init)
    return params, iterations, objective(params)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
                     cost: float | None = None, penalty: str = "uni", max_iter: int = MAX_ITER,
                     history: int = HISTORY) -> LinearProbe:
    """Fit the probe (module doc) on train features (N, D) and integer labels (N,) in [0, C).

    `num_classes` defaults to 1 + the largest label; `cost` to UNI's D * (classes in the train set) / 100.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"linear probe penalty must be one of {PENALTIES}, got {penalty!r}")
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels).ravel()
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"linear probe: features (N, D) and labels (N,) with N > 0, got {features.shape}, {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"linear probe: labels must be non-negative integers, got {labels.dtype} {np.unique(labels)[:10]}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"linear probe: label {labels.max()} outside [0, {num_classes})")
    if cost is None:
        cost = uni_cost(features.shape[1], len(np.unique(labels)))
    rows = padded_rows(len(features))
    weights = (np.arange(rows) < len(features)).astype(np.float32)
    features = np.concatenate([features, np.zeros((rows - len(features), features.shape[1]), np.float32)])
    labels = np.concatenate([labels, np.zeros(rows - len(labels), labels.dtype)])
    params, iterations, loss = _fit(features, labels.astype(np.int32), weights, np.float32(cost),
                                    num_classes=num_classes, penalty=penalty, max_iter=int(max_iter),
                                    history=int(history))
    return LinearProbe(np.asarray(params["weight"]), np.asarray(params["bias"]), float(cost), int(iterations),
                       float(loss))


def linear_probe_evaluate(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, **kwargs) -> dict[str, float]:
    """{"balanced_acc", "weighted_f1", "acc"[, "auc"]} of a probe fit on train (keyword arguments of
    `fit_linear_probe`) on the test set; "auc" when every class occurs in the test labels (UNI: binary AUC,
    or one-vs-one macro AUC for more classes)."""
    test_labels = np.asarray(test_labels).ravel().astype(np.int64)
    num_classes = kwargs.pop("num_classes", None)
    if num_classes is None:
        num_classes = int(max(np.max(train_labels), test_labels.max())) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes=num_classes, **kwargs)
    probs = probe.predict_proba(test_features)
    results = classification_metrics(test_labels, probs.argmax(axis=1))
    if set(np.unique(test_labels).tolist()) == set(range(num_classes)):
        results["auc"] = multiclass_auc(test_labels, probs)
    return results
