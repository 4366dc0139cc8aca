"""Gated attention-based multiple-instance learning (ABMIL; Ilse, Tomczak & Welling, ICML 2018), the slide
classifier UNI trains on bags of frozen tile features (Chen et al., Nat. Med. 2024, "Slide-level tasks";
the layer layout of CLAM's `Attn_Net_Gated`, Lu et al., Nat. Biomed. Eng. 2021).

    h_i = Dropout(ReLU(W_1 x_i + b_1))                                    instance embedding, 512-d (UNI)
    a_i = w^T (tanh(V h_i) * sigmoid(U h_i))                             Ilse et al. Eq. 9 (gated attention)
    alpha = softmax_i(a_i) over the bag's real instances (padding masked out)
    z = sum_i alpha_i h_i,   logits = W_c z + b_c                        Eq. 5 / 6 (attention MIL pooling)

Defaults: FC 512 + ReLU + dropout 0.25, gated attention 256 wide (dropout 0.25 on both branches), a linear
classifier: CLAM's `Attn_Net_Gated` in its default `size_arg="small"` ([1024, 512, 256], `models/model_clam.py`).
UNI's Methods report the 384-wide attention of CLAM's `size_arg="big"` ([1024, 512, 384]): `attention_dim=384`
(`--set uni_eval.abmil.attention_dim=384`). Bags of different sizes are padded to one length with a mask
(`pad_bags`), so a jitted step compiles once. UNI's training and evaluation protocol (AdamW, one slide per
step, cross-validation) is `medjax.tasks.uni_slide_classification`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
UNI_HIDDEN = 512  # CLAM size_dict "small" / "big" [1024, 512, .]: the instance embedding
CLAM_ATTENTION = 256  # CLAM size_dict "small" (the default): the gated attention's width
UNI_ATTENTION = 384  # CLAM size_dict "big", UNI's Methods
UNI_DROPOUT = 0.25


def _dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype, name: str,
           use_bias: bool = True) -> nn.Dense:
    # CLAM's initialize_weights: xavier-normal weights, zero biases.
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class GatedABMIL(nn.Module):
    """Bags (batch, instances, D) with a mask (batch, instances) of real instances -> (logits (batch, C) float32,
    attention (batch, instances) float32, zero on padding; module doc)."""

    num_classes: int
    hidden_dim: int = UNI_HIDDEN
    attention_dim: int = CLAM_ATTENTION
    dropout: float = UNI_DROPOUT
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, mask: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"GatedABMIL: features (batch, instances, D) and mask (batch, instances), got "
                             f"{features.shape} and {mask.shape}")
        mask = mask.astype(bool)
        h = _dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc")(features.astype(self.dtype))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(h))
        # Eq. 9: tanh(V h) * sigmoid(U h), each branch with dropout (CLAM's Attn_Net_Gated).
        gate_a = nn.Dropout(self.dropout, deterministic=not train)(
            jnp.tanh(_dense(self.attention_dim, ("mlp", "heads"), self.dtype, self.param_dtype, "attention_v")(h)))
        gate_b = nn.Dropout(self.dropout, deterministic=not train)(
            nn.sigmoid(_dense(self.attention_dim, ("mlp", "heads"), self.dtype, self.param_dtype, "attention_u")(h)))
        scores = _dense(1, ("heads", None), self.dtype, self.param_dtype, "attention_w")(gate_a * gate_b)[..., 0]
        scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
        # A bag with no real instance gets all-zero attention (and the classifier's bias as logits).
        has_any = mask.any(axis=1, keepdims=True)
        attention = jax.nn.softmax(jnp.where(has_any, scores, 0.0), axis=1) * mask
        pooled = jnp.einsum("bn,bnd->bd", attention.astype(self.dtype), h)  # Eq. 5
        logits = _dense(self.num_classes, ("mlp", "classes"), self.dtype, self.param_dtype, "classifier")(pooled)
        return logits.astype(jnp.float32), attention


def pad_bags(features_by_slide: Sequence[np.ndarray], length: int | None = None,
             multiple: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features (S, L, D) float32 zero-padded, mask (S, L) bool); L = `length` or the largest bag rounded up
    to `multiple`. A bag longer than `length` is an error."""
    bags = [np.asarray(b, np.float32) for b in features_by_slide]
    if not bags:
        raise ValueError("pad_bags: no bags")
    dims = {b.shape[1] if b.ndim == 2 else None for b in bags}
    if len(dims) != 1 or None in dims:
        raise ValueError(f"pad_bags: every bag must be (instances, D) with one D, got shapes {[b.shape for b in bags][:5]}")
    longest = max(len(b) for b in bags)
    length = -(-max(longest, 1) // multiple) * multiple if length is None else int(length)
    if longest > length:
        raise ValueError(f"pad_bags: a bag has {longest} instances, more than the padded length {length}")
    features = np.zeros((len(bags), length, dims.pop()), np.float32)
    mask = np.zeros((len(bags), length), bool)
    for i, bag in enumerate(bags):
        features[i, :len(bag)] = bag
        mask[i, :len(bag)] = True
    return features, mask
