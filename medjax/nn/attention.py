"""Multi-head attention shared by every Transformer in medjax (Vaswani et al., 2017, Eq. 1-2).

With `relation_mask_ratio > 0` the softmax relations are masked as in MRM (Yang et al., ICCV 2023,
Sec. 3.2.1): per row the top floor(ratio * kv_tokens) relations are zeroed (no renormalisation)
through `medjax.kernels.relation_mask.relation_mask_attention`, whose implementation is chosen by
`kernel_impl`. Otherwise attention goes through `jax.nn.dot_product_attention` (the maintained
fused path: cuDNN flash attention on GPU, XLA elsewhere).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.kernels.relation_mask import relation_mask_attention

Dtype = Any


class MultiHeadAttention(nn.Module):
    """Self-attention (`x_kv=None`) or cross-attention from `x_q` to `x_kv`.

    q/k/v kernels have logical axes ("embed", "heads", "kv"); the output kernel
    ("heads", "kv", "embed"). `x_kv` may have a different width from `x_q`: its k/v projections
    map it to the same (heads, head_dim) space, and the output has `x_q`'s width unless
    `out_features` is set.
    """

    num_heads: int
    head_dim: int | None = None  # None: x_q's width // num_heads
    out_features: int | None = None  # None: x_q's width
    relation_mask_ratio: float = 0.0  # MRM tau; 0 = plain attention
    kernel_impl: str = "auto"  # "auto" | "reference" | "pallas", passed to the dispatcher
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None) -> jax.Array:
        if x_kv is None:
            x_kv = x_q
        if x_q.ndim != 3 or x_kv.ndim != 3 or x_q.shape[0] != x_kv.shape[0]:
            raise ValueError(
                "medjax/nn/attention.py MultiHeadAttention: x_q and x_kv must be (batch, tokens, width) "
                f"with the same batch; got {x_q.shape} and {x_kv.shape}")
        width = x_q.shape[-1]
        head_dim = self.head_dim
        if head_dim is None:
            if width % self.num_heads:
                raise ValueError(
                    f"medjax/nn/attention.py MultiHeadAttention.num_heads={self.num_heads} must divide "
                    f"the query width {width} when head_dim is not given")
            head_dim = width // self.num_heads

        def projection(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                features=(self.num_heads, head_dim), axis=-1, use_bias=self.use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")),
                name=name)

        q = projection("query")(x_q)  # (batch, q_tokens, heads, head_dim)
        k = projection("key")(x_kv)
        v = projection("value")(x_kv)
        if self.relation_mask_ratio > 0.0:
            out = relation_mask_attention(q, k, v, ratio=self.relation_mask_ratio, impl=self.kernel_impl)
        else:
            out = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(
            features=self.out_features or width, axis=(-2, -1), use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="out")(out)
