"""MRM relation matching (Yang et al., ICCV 2023, Sec. 3.2.3).

Over a batch of B image-genome pairs, R[i, j] = sim(sample i's pooled features, sample j's). Matching
aligns the relations of the complete features (z_I, z_G) with those of the relation-masked ones
(z_{I,M}, z_{G,M}):

    L_self  = 1/(2B^2) sum_ij (R_II - R_II,M)^2 + (R_GG - R_GG,M)^2
    L_cross = 1/B^2    sum_ij (R_IG - R_IG,M)^2,  R_IG[i, j] = sim(z_I^i, z_G^j)

(The paper notes write R_IG[i, j] = sim(z_I^i, z_G^i), a typo: j is meant.) sim is the cosine similarity;
the paper does not say whether the features are centred. `similarity` chooses (our choice, a flag):
- "centered_cosine" (the experiments' default): each feature matrix is centred over the batch (its mean
  over the B samples subtracted, per dimension) before the cosine, i.e. R is the samples' Pearson-style
  correlation. Why: token-mean-pooled Transformer features share one dominant direction, so plain cosines
  between different samples sit near 1 (measured on the demo at init: image 0.983, genome 0.968, after
  pretraining 0.997 / 0.988); both matrices are then ~all-ones and L_self / L_cross ~1e-3 carry almost no
  sample-wise relation. Centred, the same features give off-diagonal relations of std ~0.5 (image) and the
  terms stay ~1e-2 (README, "Fine-tune and evaluate").
- "cosine": the plain cosine of the pooled features, as the equations read.
Both sides carry gradient (the paper does not stop either). B is the batch the arrays hold: under
`jax.jit` with a batch-sharded input this is the GLOBAL batch (the centring mean included), and the
B x B matrices are computed across devices. Everything is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SIMILARITIES = ("centered_cosine", "cosine")


def _check_pooled(name: str, *arrays: jax.Array) -> None:
    shapes = [a.shape for a in arrays]
    if any(a.ndim != 2 for a in arrays) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"medjax/losses/relation_matching.py {name}: expected pooled features (batch, dim) with "
                         f"one batch size, got shapes {shapes}")


def _check_similarity(similarity: str) -> bool:
    """True when the features are centred over the batch first."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"medjax/losses/relation_matching.py: similarity={similarity!r}; expected one of "
                         f"{list(SIMILARITIES)} (model.relation_similarity)")
    return similarity == "centered_cosine"


def cosine_similarity_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-8, *, center: bool = False) -> jax.Array:
    """R[i, j] = <a_i, b_j> / (max(|a_i|, eps) max(|b_j|, eps)), in float32; a (n, d), b (m, d). With `center`,
    a and b are first centred over their rows (a - mean_i a_i, b - mean_j b_j)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"medjax/losses/relation_matching.py cosine_similarity_matrix: expected (n, d) and (m, d), "
                         f"got {a.shape} and {b.shape}")
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if center:
        a = a - jnp.mean(a, axis=0, keepdims=True)
        b = b - jnp.mean(b, axis=0, keepdims=True)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return a @ b.T


def self_relation_matching(z_i: jax.Array, z_i_m: jax.Array, z_g: jax.Array, z_g_m: jax.Array, *,
                           similarity: str = "cosine") -> jax.Array:
    """L_self (MRM Sec. 3.2.3): image-image and genome-genome relations, complete vs masked."""
    _check_pooled("self_relation_matching", z_i, z_i_m, z_g, z_g_m)
    sim = lambda a: cosine_similarity_matrix(a, a, center=_check_similarity(similarity))  # noqa: E731
    batch = z_i.shape[0]
    image_term = jnp.sum((sim(z_i) - sim(z_i_m)) ** 2)
    genome_term = jnp.sum((sim(z_g) - sim(z_g_m)) ** 2)
    return (image_term + genome_term) / (2.0 * batch ** 2)


def cross_relation_matching(z_i: jax.Array, z_g: jax.Array, z_i_m: jax.Array, z_g_m: jax.Array, *,
                            similarity: str = "cosine") -> jax.Array:
    """L_cross (MRM Sec. 3.2.3): image-genome relations, complete vs masked (needs equal feature dims); with
    "centered_cosine" each modality is centred over the batch on its own."""
    _check_pooled("cross_relation_matching", z_i, z_g, z_i_m, z_g_m)
    center = _check_similarity(similarity)
    batch = z_i.shape[0]
    diff = cosine_similarity_matrix(z_i, z_g, center=center) - cosine_similarity_matrix(z_i_m, z_g_m, center=center)
    return jnp.sum(diff ** 2) / batch ** 2
