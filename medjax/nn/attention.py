"""Multi-head attention shared by every Transformer in medjax (Vaswani et al., 2017, Eq. 1-2).

With `relation_mask_ratio > 0` the softmax relations are masked as in MRM (Yang et al., ICCV 2023,
Sec. 3.2.1): per row the top floor(ratio * kv_tokens) relations are zeroed (no renormalisation)
through `medjax.kernels.relation_mask.relation_mask_attention`, whose implementation is chosen by
`kernel_impl`. Otherwise attention goes through `jax.nn.dot_product_attention` (the maintained
fused path: cuDNN flash attention on GPU, XLA elsewhere).

The projections are `HeadsDense` rather than `nn.DenseGeneral`: DenseGeneral initialises a
multi-axis kernel through its flattened 2-D shape, and a logically partitioned initialiser then
applies its 3-name sharding constraint to the 2-D value, which fails under a mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.kernels.relation_mask import relation_mask_attention

Dtype = Any


class HeadsDense(nn.Module):
    """Dense contracting the last `in_dims` axes of x into `features` (e.g. width -> (heads,
    head_dim) or (heads, head_dim) -> width); kernel shape in_shape + features with logical axes
    `kernel_axes`, Glorot-uniform over (fan_in, fan_out) of the flattened kernel, zero bias."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_dims: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = None  # None: Glorot-uniform over the flattened (fan_in, fan_out)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.in_dims, len(self.features)
        if len(self.kernel_axes) != n_in + n_out:
            raise ValueError(f"medjax/nn/attention.py HeadsDense.kernel_axes={self.kernel_axes} must name "
                             f"{n_in + n_out} kernel axes")
        init = self.kernel_init or nn.initializers.xavier_uniform(
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            tuple(x.shape[-n_in:]) + tuple(self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[n_in:])
            bias = self.param("bias", bias_init, tuple(self.features), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.tensordot(x, kernel, axes=n_in)
        return y if bias is None else y + bias


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
        dense = lambda features, axes, in_dims, name: HeadsDense(  # noqa: E731
            features, axes, in_dims, self.use_bias, self.dtype, self.param_dtype, name=name)
        heads = (self.num_heads, head_dim)
        q = dense(heads, ("embed", "heads", "kv"), 1, "query")(x_q)  # (batch, q_tokens, heads, head_dim)
        k = dense(heads, ("embed", "heads", "kv"), 1, "key")(x_kv)
        v = dense(heads, ("embed", "heads", "kv"), 1, "value")(x_kv)
        if self.relation_mask_ratio > 0.0:
            out = relation_mask_attention(q, k, v, ratio=self.relation_mask_ratio, impl=self.kernel_impl)
        else:
            out = jax.nn.dot_product_attention(q, k, v)
        return dense((self.out_features or width,), ("heads", "kv", "embed"), 2, "out")(out)
