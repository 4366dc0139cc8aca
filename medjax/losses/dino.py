"""DINOv2's self-distillation objectives (Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision", TMLR 2024; `dinov2/loss/`), the pretraining of UNI (Chen et al., Nat. Med. 2024).

- `dino_loss`: image-level self-distillation (DINO, Caron et al. 2021, Eq. 2-3): cross-entropy
  H(P_t, P_s) = -sum_k P_t[k] log softmax(s / tau_s)[k], averaged over the batch, summed over every
  (student crop, teacher crop) pair of different views and divided by the number of pairs
  (2 global + 8 local student crops vs 2 teacher crops: 18 pairs).
- `ibot_loss`: patch-level masked-token distillation (iBOT, Zhou et al. 2022, Eq. 1) on the masked
  patches, each image's tokens weighted 1 / (its masked patches), divided by the number of images.
- `koleo_loss`: the Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019) on
  L2-normalised features, in float32: -mean_i log(||x_i - x_nn(i) + eps|| + eps).
- Teacher targets: `centered_teacher_probs` (DINO centering, softmax((t - c) / tau_t)) with the
  running center `update_center`, or `sinkhorn_knopp` (SwAV, Caron et al. 2020; 3 iterations).

Everything is written for global arrays under `jax.jit`: a batch statistic (Sinkhorn-Knopp's row and
column sums, the center's batch mean) is over the whole global batch, which is what DINOv2's
all-reduces compute across GPUs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _float32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def centered_teacher_probs(teacher_logits: jax.Array, center: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """softmax((teacher_logits - center) / temperature) over the last axis (DINO centering + sharpening)."""
    return jax.nn.softmax((_float32(teacher_logits) - _float32(center)) / temperature, axis=-1)


def update_center(center: jax.Array, batch_mean: jax.Array, momentum: float = 0.9) -> jax.Array:
    """EMA of the teacher's mean output: c <- m c + (1 - m) mean(t) (DINO Eq. 4; DINOv2 momentum 0.9)."""
    return center * momentum + _float32(batch_mean).astype(center.dtype) * (1.0 - momentum)


def sinkhorn_knopp(teacher_logits: jax.Array, temperature: jax.Array | float, num_iterations: int = 3,
                   valid: jax.Array | None = None) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (DINOv2 `sinkhorn_knopp_teacher`), (rows, K) -> (rows, K).

    Q = exp(t / tau)^T (K x B); Q /= sum(Q); then `num_iterations` times: each prototype row sums to
    1/K, each sample column to 1/B; finally Q *= B so every sample's assignment sums to 1.
    `valid` (rows,) bool: only those rows are samples (B = their count; the rest get zeros), e.g. the
    masked patches in a fixed-size buffer. Subtracting the global max before exp changes nothing after
    the first normalisation and keeps exp finite.
    """
    t = _float32(teacher_logits) / temperature
    if valid is None:
        valid = jnp.ones(t.shape[0], bool)
    shift = jnp.max(jnp.where(valid[:, None], t, -jnp.inf))
    q = jnp.where(valid[:, None], jnp.exp(t - jnp.where(jnp.any(valid), shift, 0.0)), 0.0).T  # (K, B)
    num_samples = jnp.sum(valid).astype(jnp.float32)
    num_prototypes = q.shape[0]
    q = _safe_divide(q, jnp.sum(q))
    for _ in range(num_iterations):
        q = _safe_divide(q, jnp.sum(q, axis=1, keepdims=True)) / num_prototypes
        q = _safe_divide(q, jnp.sum(q, axis=0, keepdims=True)) / jnp.maximum(num_samples, 1.0)
    return (q * num_samples).T


def _safe_divide(x: jax.Array, y: jax.Array) -> jax.Array:
    """x / y, 0 where y == 0 (empty rows or columns of a padded buffer)."""
    return jnp.where(y > 0, x / jnp.where(y > 0, y, 1.0), 0.0)


def cross_entropy(teacher_probs: jax.Array, student_logits: jax.Array, student_temperature: float) -> jax.Array:
    """-sum_k P_t[k] log softmax(s / tau_s)[k] over the last axis, in float32."""
    log_probs = jax.nn.log_softmax(_float32(student_logits) / student_temperature, axis=-1)
    return -jnp.sum(_float32(teacher_probs) * log_probs, axis=-1)


def target_entropies(teacher_probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean entropy of the teacher's per-crop targets, entropy of their batch mean), in nats, of probs (..., K): the
    two collapse modes of DINO (Caron et al. 2021, Sec. 5.3, Fig. 7) -- a uniform target has both at ln K, one
    prototype for every crop has both at 0; a working teacher is sharp per crop (low) and spread over the batch
    (high)."""
    p = _float32(teacher_probs).reshape(-1, teacher_probs.shape[-1])
    entropy = lambda q: -jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1)  # noqa: E731
    return jnp.mean(entropy(p)), entropy(jnp.mean(p, axis=0))


def dino_loss(student_logits: jax.Array, teacher_probs: jax.Array, student_temperature: float = 0.1) -> jax.Array:
    """DINO loss over crop pairs of different views.

    student_logits (S, B, K): S student crops, the first T of which are the teacher's T views (DINOv2:
    the 2 global crops, then the local crops); teacher_probs (T, B, K). Returns
    sum_{s, t: s != t} mean_b H(P_t[t, b], P_s[s, b]) / (S * T - T): DINOv2's
    (local loss + 2 * global loss) / (2 + 8 * 2) with each student global crop matched to the other
    teacher crop.
    """
    s_crops, batch = student_logits.shape[:2]
    t_crops = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != student_logits.shape[1:] or t_crops > s_crops:
        raise ValueError(f"medjax/losses/dino.py dino_loss: student logits {student_logits.shape} and teacher probs "
                         f"{teacher_probs.shape} must be (S, B, K) and (T <= S, B, K)")
    log_probs = jax.nn.log_softmax(_float32(student_logits) / student_temperature, axis=-1)
    # pairs[t, s] = mean over the batch of H(teacher view t, student crop s)
    pairs = -jnp.einsum("tbk,sbk->ts", _float32(teacher_probs), log_probs) / batch
    different_view = 1.0 - jnp.eye(t_crops, s_crops)
    return jnp.sum(pairs * different_view) / (s_crops * t_crops - t_crops)


def ibot_loss(student_logits: jax.Array, teacher_probs: jax.Array, weights: jax.Array, num_images: int,
              student_temperature: float = 0.1) -> jax.Array:
    """iBOT masked-patch loss (DINOv2 `iBOTPatchLoss.forward_masked`).

    student_logits, teacher_probs (U, K): the masked patch tokens (a buffer; padding rows have weight
    0); weights (U,): 1 / (masked patches of the token's image); num_images: the images masks were
    drawn for (both global crops of every sample). Returns sum_u w_u H(P_t[u], P_s[u]) / num_images.
    """
    return jnp.sum(_float32(weights) * cross_entropy(teacher_probs, student_logits, student_temperature)) / num_images


def koleo_loss(features: jax.Array, eps: float = 1e-8) -> jax.Array:
    """KoLeo (DINOv2 `KoLeoLoss`) on features (B, D), always in float32 (the log of a tiny distance
    is -inf in fp16; duplicates in a batch make it large in any precision).

    x = x / max(||x||, eps); nn(i) = argmax_{j != i} <x_i, x_j>; loss = -mean_i log(||x_i - x_nn(i) + eps|| + eps)
    (torch `PairwiseDistance(eps=1e-8)` adds eps to the difference).
    """
    x = _float32(features)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    n = x.shape[0]
    dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
    neighbour = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
    distances = jnp.linalg.norm(x - x[neighbour] + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))


def grouped_koleo_loss(features: jax.Array, group_size: int = 0, eps: float = 1e-8) -> jax.Array:
    """`koleo_loss` averaged over consecutive groups of `group_size` rows (0: one group of all rows).

    DINOv2 computes KoLeo per GPU (64 images each in its recipes); grouping reproduces that batch
    size whatever the number of devices."""
    n = features.shape[0]
    if group_size <= 0 or group_size >= n:
        return koleo_loss(features, eps)
    if n % group_size:
        raise ValueError(f"medjax/losses/dino.py grouped_koleo_loss: {n} rows do not split into groups of {group_size}")
    groups = features.reshape(n // group_size, group_size, features.shape[-1])
    return jnp.mean(jax.vmap(lambda g: koleo_loss(g, eps))(groups))
