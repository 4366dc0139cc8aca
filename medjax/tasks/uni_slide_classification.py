"""UNI's slide-level evaluation (Chen et al., Nat. Med. 2024, "Slide-level tasks"): a gated ABMIL classifier
(`medjax.models.abmil.GatedABMIL`; Ilse et al., ICML 2018) trained on bags of frozen tile features, one
slide per step, and scored on held-out slides.

UNI's setting: cross-entropy, AdamW with lr 1e-4 cosine-decayed to 0, weight decay 1e-5, 20 epochs, one
slide per step in a shuffled order (these optimiser numbers are from UNI's Methods as we recall them; the
reference file does not list them). Bags of different sizes are padded to one length with a mask
(`medjax.models.abmil.pad_bags`), so the train step compiles once. Without a train / test split, stratified
k-fold cross-validation over slides with the held-out predictions of all folds pooled (our choice for small
sets such as the demo's 4 slides).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from medjax.metrics.classification import quadratic_weighted_kappa
from medjax.metrics.multiclass import classification_metrics, multiclass_auc
from medjax.models.abmil import GatedABMIL, pad_bags
from medjax.errors import MedjaxInputError

# AdamW whose lr and weight decay live in the optimizer state (set per step from the host), so one jitted
# step serves every training run of a model configuration.
_ADAMW = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)


def _check_labels(labels: Sequence[int], count: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if len(labels) != count or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
            or labels.max() >= num_classes:
        raise MedjaxInputError(f"ABMIL: need {count} integer slide labels in [0, {num_classes}), got {labels[:10]}")
    return labels.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model: GatedABMIL, key, bag, bag_mask):
    params = nn.unbox(model.init({"params": key}, bag, bag_mask)["params"])
    return params, _ADAMW.init(params)


@functools.partial(jax.jit, static_argnames=("model",))
def _train_step(model: GatedABMIL, params, opt_state, bag, bag_mask, label, key, step, lr, weight_decay):
    opt_state.hyperparams.update(learning_rate=lr, weight_decay=weight_decay)  # traced: no recompiles
    rng = jax.random.fold_in(key, step)

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, bag, bag_mask, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _ADAMW.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("model",))
def _predict_step(model: GatedABMIL, params, bag, bag_mask):
    logits, attention = model.apply({"params": params}, bag, bag_mask, train=False)
    return jax.nn.softmax(logits, axis=-1), attention


def train_abmil(model: GatedABMIL, features_by_slide: Sequence[np.ndarray], labels: Sequence[int], *,
                epochs: int = 20, lr: float = 1e-4, weight_decay: float = 1e-5, seed: int = 0,
                length: int | None = None) -> Any:
    """Train `model` on the bags (one (instances, D) array per slide) and slide labels: cross-entropy, AdamW
    with lr cosine-decayed to 0 over all steps, one slide per step in a seeded shuffled order per epoch
    (UNI's setting, module doc); returns the params (unboxed). Bags are padded to `length` (default: the
    largest, rounded up), so the step compiles once per (model, length, D)."""
    features, mask = pad_bags(features_by_slide, length)
    labels = _check_labels(labels, len(features), model.num_classes)
    key = jax.random.key(seed)
    params, opt_state = _init(model, key, features[:1], mask[:1])
    total = max(epochs * len(features), 1)
    order_rng = np.random.default_rng(seed)
    dropout_key = jax.random.fold_in(key, 1)
    step = 0
    for _ in range(epochs):
        for i in order_rng.permutation(len(features)):
            step_lr = np.float32(0.5 * lr * (1 + np.cos(np.pi * step / total)))  # cosine decay to 0
            params, opt_state, _ = _train_step(model, params, opt_state, features[i:i + 1], mask[i:i + 1],
                                               labels[i:i + 1], dropout_key, np.int32(step), step_lr,
                                               np.float32(weight_decay))
            step += 1
    return params


def predict_abmil(model: GatedABMIL, params: Any, features_by_slide: Sequence[np.ndarray], *,
                  length: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(class probabilities (S, C), per-slide attention weights (instances,)) in eval mode (no dropout)."""
    features, mask = pad_bags(features_by_slide, length)
    probs, attention = [], []
    for i in range(len(features)):
        slide_probs, weights = _predict_step(model, params, features[i:i + 1], mask[i:i + 1])
        probs.append(np.asarray(slide_probs)[0])
        attention.append(np.asarray(weights)[0, :int(mask[i].sum())])
    return np.stack(probs), attention


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row: per class, a seeded shuffle dealt round-robin over `folds` folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), np.int32)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def slide_level_eval(bags: list[np.ndarray], labels: np.ndarray, test: np.ndarray | None, settings,
                     where: str = "slides.csv") -> dict[str, float]:
    """ABMIL (`abmil/...`): trained on train slides and scored on test slides, or, without a split, k-fold
    cross-validated with the held-out predictions of all folds pooled. `settings.abmil`: the `abmil` block of
    `medjax.tasks.uni_eval.uni_eval_config()`."""
    cfg = settings.abmil
    num_classes = int(labels.max()) + 1
    if test is not None:
        folds = [(~test, test)]
    else:
        smallest = min(np.bincount(labels, minlength=num_classes))
        k = min(int(cfg.folds), int(smallest))
        if k < 2:
            raise MedjaxInputError(f"{where}: ABMIL cross-validation needs >= 2 slides of every class, got counts "
                             f"{np.bincount(labels, minlength=num_classes).tolist()}; add slides or a split column")
        fold = stratified_folds(labels, k, cfg.seed)
        folds = [(fold != f, fold == f) for f in range(k)]
    model = GatedABMIL(num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
    length = -(-max(len(b) for b in bags) // 64) * 64
    probs = np.zeros((len(bags), num_classes), np.float32)
    scored = np.zeros(len(bags), bool)
    for train, held_out in folds:
        params = train_abmil(model, [bags[i] for i in np.flatnonzero(train)], labels[train], epochs=cfg.epochs,
                             lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, length=length)
        probs[held_out], _ = predict_abmil(model, params, [bags[i] for i in np.flatnonzero(held_out)], length=length)
        scored |= held_out
    results = {f"abmil/{k}": v for k, v in classification_metrics(labels[scored], probs[scored].argmax(1)).items()}
    if len(np.unique(labels[scored])) == num_classes:
        results["abmil/auc"] = multiclass_auc(labels[scored], probs[scored])
    if cfg.get("ordinal", False):  # ordered grades (PANDA's ISUP 0-5): UNI reports quadratic kappa
        results["abmil/quadratic_kappa"] = quadratic_weighted_kappa(labels[scored], probs[scored].argmax(1),
                                                                    max(num_classes, 2))
    return results | {"abmil/slides": float(scored.sum())}
