"""k-nearest-neighbour probe of frozen features (UNI, Chen et al., Nat. Med. 2024, "ROI-level tasks": KNN with
k = 20; DINOv2, Oquab et al., TMLR 2024, Sec. 7 / `dinov2/eval/knn.py`).

Two protocols, one implementation:
- UNI (the default; `uni/downstream/eval_patch_features/fewshot.py:eval_knn`): centre the features with the
  train mean, L2-normalise, take the k = 20 nearest train features in Euclidean distance and predict the
  majority label (scikit-learn `KNeighborsClassifier(n_neighbors=20)`, uniform weights; a tie in the vote
  goes to the smallest class index, as sklearn's mode does).
- DINOv2 (`center=False, voting="temperature"`): L2-normalised features, the k most cosine-similar train
  features each vote with weight exp(s / T), T = 0.07.
On unit vectors ||q - t||^2 = 2 - 2 q.t, so nearest in Euclidean distance = most cosine-similar; neighbours
are found by cosine similarity in both cases. Equal similarities keep the lower train index first.

The search is batched over queries and over chunks of the train set (a running top-k merged per chunk), so
memory is O(query_batch x (train_chunk + k)) whatever the train set size; one jitted function per shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medjax.metrics.multiclass import classification_metrics

UNI_K = 20  # UNI Methods: KNN probe with k = 20
DINOV2_TEMPERATURE = 0.07  # DINOv2 `eval/knn.py`: T = 0.07
VOTINGS = ("majority", "temperature")


def prepare_features(train: np.ndarray, test: np.ndarray, *, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """UNI's preprocessing: subtract the train mean (when `center`) from both, then L2-normalise rows (float32)."""
    train, test = np.asarray(train, np.float32), np.asarray(test, np.float32)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1] or not len(train):
        raise ValueError(f"kNN: train (N, D) and queries (M, D) must share D (N > 0), got {train.shape} and {test.shape}")
    if center:
        mean = train.mean(axis=0, keepdims=True)
        train, test = train - mean, test - mean
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731 (F.normalize)
    return unit(train).astype(np.float32), unit(test).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(queries, chunk, chunk_labels, chunk_valid, best_sims, best_labels, *, k):
    """Running top-k of (similarity, label) after one train chunk; padded train rows never win."""
    sims = queries @ chunk.T  # (q, c)
    sims = jnp.where(chunk_valid[None, :], sims, -jnp.inf)
    # The running best come first, so on equal similarity the earlier (lower-index) train row is kept.
    all_sims = jnp.concatenate([best_sims, sims], axis=1)
    all_labels = jnp.concatenate([best_labels, jnp.broadcast_to(chunk_labels[None, :], sims.shape)], axis=1)
    top_sims, index = jax.lax.top_k(all_sims, k)
    return top_sims, jnp.take_along_axis(all_labels, index, axis=1)


def nearest_neighbours(train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, k: int, *,
                       query_batch: int = 1024, train_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (M, k), labels (M, k)) of the k most similar rows of `train` (N, D) for each query (M, D),
    by dot product (cosine on normalised rows), most similar first."""
    train, queries = np.asarray(train, np.float32), np.asarray(queries, np.float32)
    train_labels = np.asarray(train_labels, np.int32).ravel()
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: train (N, D) and queries (M, D) must share D, got {train.shape} and {queries.shape}")
    if len(train_labels) != len(train):
        raise ValueError(f"kNN: {len(train_labels)} train labels for {len(train)} train features")
    if not 1 <= k <= len(train):
        raise ValueError(f"kNN: k = {k} must lie in [1, {len(train)}] (the number of train features)")
    chunk = min(train_chunk, len(train))
    n_chunks = -(-len(train) // chunk)
    pad = n_chunks * chunk - len(train)
    train_p = np.concatenate([train, np.zeros((pad, train.shape[1]), np.float32)])
    labels_p = np.concatenate([train_labels, np.zeros(pad, np.int32)])
    valid_p = np.arange(len(train_p)) < len(train)
    qb = min(query_batch, max(len(queries), 1))
    out_sims, out_labels = [], []
    for start in range(0, len(queries), qb):
        q = queries[start:start + qb]
        rows = len(q)
        q = np.concatenate([q, np.zeros((qb - rows, q.shape[1]), np.float32)])
        best_sims = np.full((qb, k), -np.inf, np.float32)
        best_labels = np.zeros((qb, k), np.int32)
        for c in range(n_chunks):
            part = slice(c * chunk, (c + 1) * chunk)
            best_sims, best_labels = _merge_topk(q, train_p[part], labels_p[part], valid_p[part],
                                                 best_sims, best_labels, k=k)
        out_sims.append(np.asarray(best_sims)[:rows])
        out_labels.append(np.asarray(best_labels)[:rows])
    return np.concatenate(out_sims), np.concatenate(out_labels)


def vote(neighbour_sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, *, voting: str = "majority",
         temperature: float = DINOV2_TEMPERATURE) -> np.ndarray:
    """Class scores (M, C): neighbour counts ("majority") or sums of exp(similarity / T) ("temperature")."""
    if voting not in VOTINGS:
        raise ValueError(f"kNN voting must be one of {VOTINGS}, got {voting!r}")
    one_hot = np.eye(num_classes, dtype=np.float64)[np.asarray(neighbour_labels)]  # (M, k, C)
    if voting == "majority":
        weights = np.ones(np.shape(neighbour_sims), np.float64)
    else:
        sims = np.asarray(neighbour_sims, np.float64)
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)  # a per-row scale: argmax unchanged
    return (one_hot * weights[..., None]).sum(axis=1)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, *, k: int = UNI_K,
                num_classes: int | None = None, center: bool = True, voting: str = "majority",
                temperature: float = DINOV2_TEMPERATURE, query_batch: int = 1024,
                train_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels int32 (M,), class scores (M, C)) of the kNN classifier (module doc); argmax ties go to
    the smallest class index."""
    train_labels = np.asarray(train_labels).ravel()
    if train_labels.size and (not np.issubdtype(train_labels.dtype, np.integer) or train_labels.min() < 0):
        raise ValueError(f"kNN: train labels must be non-negative integers, got {train_labels.dtype}")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    train, test = prepare_features(train_features, test_features, center=center)
    sims, labels = nearest_neighbours(train, train_labels, test, k, query_batch=query_batch, train_chunk=train_chunk)
    scores = vote(sims, labels, num_classes, voting=voting, temperature=temperature)
    return scores.argmax(axis=1).astype(np.int32), scores


def knn_evaluate(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, **kwargs) -> dict[str, float]:
    """{"balanced_acc", "weighted_f1", "acc"} of `knn_predict(...)` (same keyword arguments) on the test set."""
    predictions, _ = knn_predict(train_features, train_labels, test_features, **kwargs)
    return classification_metrics(np.asarray(test_labels).ravel().astype(np.int64), predictions.astype(np.int64))
