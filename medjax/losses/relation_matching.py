"""MRM relation matching (Yang et al., ICCV 2023, Sec. 3.2.3).

Over a batch of B image-genome pairs, R[i, j] = cosine similarity between sample i's and sample
j's pooled features. Matching aligns the relations of the complete features (z_I, z_G) with those
of the relation-masked ones (z_{I,M}, z_{G,M}):

    L_self  = 1/(2B^2) sum_ij (R_II - R_II,M)^2 + (R_GG - R_GG,M)^2
    L_cross = 1/B^2    sum_ij (R_IG - R_IG,M)^2,  R_IG[i, j] = sim(z_I^i, z_G^j)

(The paper notes write R_IG[i, j] = sim(z_I^i, z_G^i), a typo: j is meant.) Both sides carry
gradient (the paper does not stop either). B is the batch the arrays hold: under `jax.jit` with a
batch-sharded input this is the GLOBAL batch, and the B x B matrices are computed across devices.
Everything is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_pooled(name: str, *arrays: jax.Array) -> None:
    shapes = [a.shape for a in arrays]
    if any(a.ndim != 2 for a in arrays) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"medjax/losses/relation_matching.py {name}: expected pooled features (batch, dim) with "
                         f"one batch size, got shapes {shapes}")


def cosine_similarity_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """R[i, j] = <a_i, b_j> / (max(|a_i|, eps) max(|b_j|, eps)), in float32; a (n, d), b (m, d)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"medjax/losses/relation_matching.py cosine_similarity_matrix: expected (n, d) and (m, d), "
                         f"got {a.shape} and {b.shape}")
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return a @ b.T


def self_relation_matching(z_i: jax.Array, z_i_m: jax.Array, z_g: jax.Array, z_g_m: jax.Array) -> jax.Array:
    """L_self (MRM Sec. 3.2.3): image-image and genome-genome relations, complete vs masked."""
    _check_pooled("self_relation_matching", z_i, z_i_m, z_g, z_g_m)
    batch = z_i.shape[0]
    image_term = jnp.sum((cosine_similarity_matrix(z_i, z_i) - cosine_similarity_matrix(z_i_m, z_i_m)) ** 2)
    genome_term = jnp.sum((cosine_similarity_matrix(z_g, z_g) - cosine_similarity_matrix(z_g_m, z_g_m)) ** 2)
    return (image_term + genome_term) / (2.0 * batch ** 2)


def cross_relation_matching(z_i: jax.Array, z_g: jax.Array, z_i_m: jax.Array, z_g_m: jax.Array) -> jax.Array:
    """L_cross (MRM Sec. 3.2.3): image-genome relations, complete vs masked (needs equal feature dims)."""
    _check_pooled("cross_relation_matching", z_i, z_g, z_i_m, z_g_m)
    batch = z_i.shape[0]
    diff = cosine_similarity_matrix(z_i, z_g) - cosine_similarity_matrix(z_i_m, z_g_m)
    return jnp.sum(diff ** 2) / batch ** 2
