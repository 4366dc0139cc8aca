"""The one Transformer stack of medjax (Vaswani et al., NeurIPS 2017): attention, MLP, block, layer stack.

- `MultiHeadAttention`: self- or cross-attention (Eq. 1-2) with an optional boolean mask, attention
  dropout, and MRM's relation masking (Yang et al., ICCV 2023, Sec. 3.2.1: per row the top
  floor(ratio * kv_tokens) relations are zeroed, `medjax.kernels.relation_mask`). Plain attention goes
  through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA elsewhere); `fused=False`
  gives the explicit softmax(QK^T / sqrt(d)) V, the definition.
- `Mlp`: Dense -> activation -> Dense (ViT Eq. 3; "gelu", CLIP's "quick_gelu", ...), or SwiGLU
  (Shazeer 2020; DINOv2's `SwiGLUFFNFused`: w12 -> silu(a) * b -> w3).
- `TransformerBlock`: pre-norm x + attn(LN(x)[, LN(x_kv)]), x + mlp(LN(x)) (ViT, CLIP) or post-norm
  LN(x + attn(x)), LN(x + mlp(x)) (BERT), with CaiT LayerScale (Touvron et al., ICCV 2021) and stochastic
  depth (Huang et al., ECCV 2016). Param names are fields, so each model keeps its converters' layout.
- The layer stack (`depth` blocks unrolled or under one `nn.scan`, with a remat policy) is
  `medjax.nn.layer_stack`; `stack_layers` / `unstack_layers` / `match_layer_layout` / `unrolled_shapes` move
  params between its two layouts (`medjax.nn.transformer_layout`, re-exported here).

The projections are `HeadsDense` rather than `nn.DenseGeneral`: DenseGeneral initialises a multi-axis
kernel through its flattened 2-D shape, and a logically partitioned initialiser then applies its 3-name
sharding constraint to the 2-D value, which fails under a mesh.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.kernels.relation_mask import relation_mask_attention
# The layout converters live in their own file; re-exported here (their public path, see __all__).
from medjax.nn.transformer_layout import (
    LAYERS, SCAN_NAME, layer_count, layer_intermediates, match_layer_layout, stack_layers, unrolled_shapes,
    unstack_layers)

__all__ = [
    "ACTIVATIONS", "TOKENS", "DropPath", "HeadsDense", "Mlp", "MultiHeadAttention", "TransformerBlock", "activation",
    "dense", "drop_add_residual_stochastic_depth", "layer_norm", "mlp", "softmax_attention",
    # medjax.nn.transformer_layout
    "LAYERS", "SCAN_NAME", "layer_count", "layer_intermediates", "match_layer_layout", "stack_layers",
    "unrolled_shapes", "unstack_layers",
]

Dtype = Any
TOKENS = ("batch", "length", "embed")

# transformers.activations.ACT2FN entries used by the ViT / CLIP / BERT / RoBERTa families.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's QuickGELU
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU (Hendrycks & Gimpel, 2016)
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config's `hidden_act` names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"medjax/nn/transformer.py activation: {name!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)} or 'swiglu' (Mlp)")
    return ACTIVATIONS[name]


def layer_norm(dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None, *,
               eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm (eps 1e-6: big_vision/MAE/timm ViT; CLIP and BERT pass theirs), scale and bias on "embed"."""
    return nn.LayerNorm(eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype,
          name: str | None = None, use_bias: bool = True, bias_std: float = 0.0, kernel_init: Any = None) -> nn.Dense:
    """nn.Dense with a Glorot-uniform kernel (or `kernel_init`) on logical axes `axes`; bias on the output axis,
    zeros or normal(bias_std) (ViT's MLP: 1e-6, big_vision)."""
    bias_init = nn.initializers.normal(bias_std) if bias_std else nn.initializers.zeros_init()
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init or nn.initializers.xavier_uniform(), axes),
                    bias_init=nn.with_logical_partitioning(bias_init, axes[1:]))


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
            raise ValueError(f"medjax/nn/transformer.py HeadsDense.kernel_axes={self.kernel_axes} must name "
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


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(Q K^T / sqrt(head_dim), masked) V on (batch, tokens, heads, head_dim), the softmax in float32;
    `mask` broadcasts to (batch, heads, q_tokens, kv_tokens), True = attend (Vaswani et al. Eq. 1)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadAttention(nn.Module):
    """Self-attention (`x_kv=None`) or cross-attention from `x_q` to `x_kv`.

    q/k/v kernels have logical axes ("embed", "heads", "kv"); the output kernel ("heads", "kv", "embed").
    `x_kv` may have a different width from `x_q`: its k/v projections map it to the same (heads, head_dim)
    space, and the output has `x_q`'s width unless `out_features` is set. `mask` broadcasts to (batch,
    heads, q_tokens, kv_tokens), True = attend.
    """

    num_heads: int
    head_dim: int | None = None  # None: x_q's width // num_heads
    out_features: int | None = None  # None: x_q's width
    relation_mask_ratio: float = 0.0  # MRM tau; 0 = plain attention
    kernel_impl: str = "auto"  # relation masking: "auto" | "reference" | "pallas", passed to the dispatcher
    dropout_rate: float = 0.0  # on the attention probabilities, in training
    fused: bool = True  # jax.nn.dot_product_attention; False: `softmax_attention` (the definition)
    implementation: str | None = None  # jax.nn.dot_product_attention's: None = cuDNN where it applies, else XLA
    sow_query_logits: bool = False  # sow the first query token's logits q_0 K^T / sqrt(d) (intermediates)
    use_bias: bool = True
    qkv_bias: bool | None = None  # the q/k/v projections' bias; None: use_bias (the output's is use_bias)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = None  # every projection's kernel initialiser; None: HeadsDense's Glorot-uniform

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
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
        proj = lambda features, axes, in_dims, name, bias=self.use_bias: HeadsDense(  # noqa: E731
            features, axes, in_dims, bias, self.dtype, self.param_dtype, self.kernel_init, name=name)
        heads, qkv_bias = (self.num_heads, head_dim), self.use_bias if self.qkv_bias is None else self.qkv_bias
        q = proj(heads, ("embed", "heads", "kv"), 1, "query", qkv_bias)(x_q)  # (batch, q_tokens, heads, head_dim)
        k = proj(heads, ("embed", "heads", "kv"), 1, "key", qkv_bias)(x_kv)
        v = proj(heads, ("embed", "heads", "kv"), 1, "value", qkv_bias)(x_kv)
        if self.sow_query_logits:  # (batch, heads, kv_tokens) float32, e.g. [CLS]'s attention (UniMedI Sec. 3.2)
            logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k).astype(jnp.float32) / math.sqrt(head_dim)
            self.sow("intermediates", "query_logits", logits)
        if self.relation_mask_ratio > 0.0:
            if mask is not None:
                raise ValueError("medjax/nn/transformer.py MultiHeadAttention: relation masking takes no mask")
            out = relation_mask_attention(q, k, v, ratio=self.relation_mask_ratio, impl=self.kernel_impl)
        elif train and self.dropout_rate > 0.0:  # dropped probabilities: flax's einsum attention
            out = nn.dot_product_attention(q, k, v, mask=mask, dropout_rng=self.make_rng("dropout"),
                                           dropout_rate=self.dropout_rate, deterministic=False, dtype=self.dtype)
        elif self.fused:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        else:
            out = softmax_attention(q, k, v, mask)
        return proj((self.out_features or width,), ("heads", "kv", "embed"), 2, "out")(out)


class Mlp(nn.Module):
    """fc2(act(fc1(x))) (ViT Eq. 3), or with activation="swiglu" w3(silu(a) * b), (a; b) = w12(x)
    (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6; DINOv2 `SwiGLUFFNFused` layout: one fused w12
    whose first half is the gate). `bias_std`: the fc/w biases' init std (0: zeros). `dropout`: on the hidden
    activations, in training (vit-pytorch's FeedForward)."""

    mlp_dim: int
    activation: str = "gelu"
    bias_std: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return mlp(self, x, self.mlp_dim, self.activation, self.bias_std, self.dtype, self.param_dtype,
                   dropout=self.dropout, train=train)


def mlp(scope: nn.Module, x: jax.Array, mlp_dim: int, act: str, bias_std: float, dtype: Dtype,
        param_dtype: Dtype, *, dropout: float = 0.0, train: bool = False) -> jax.Array:
    """The MLP's layers created inside `scope`'s compact method (so a block can hold fc1/fc2 itself); `dropout`
    on the hidden activations in training (no module at all when 0)."""
    del scope  # the Dense layers below bind to the calling compact module
    width = x.shape[-1]
    drop = (lambda y: nn.Dropout(dropout)(y, deterministic=not train)) if dropout else (lambda y: y)  # noqa: E731
    if act == "swiglu":
        gate, value = jnp.split(dense(2 * mlp_dim, ("embed", "mlp"), dtype, param_dtype, "w12", bias_std=bias_std)(x),
                                2, axis=-1)
        return dense(width, ("mlp", "embed"), dtype, param_dtype, "w3", bias_std=bias_std)(
            drop(jax.nn.silu(gate) * value))
    y = drop(activation(act)(dense(mlp_dim, ("embed", "mlp"), dtype, param_dtype, "fc1", bias_std=bias_std)(x)))
    return dense(width, ("mlp", "embed"), dtype, param_dtype, "fc2", bias_std=bias_std)(y)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drops a sample's residual branch with prob `rate` (or the
    call's `rate`, which may be traced, e.g. a scanned per-layer rate)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rate: jax.Array | float | None = None) -> jax.Array:
        rate = self.rate if rate is None else rate
        if not train or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def drop_add_residual_stochastic_depth(x: jax.Array, residual_fn: Callable[[jax.Array], jax.Array], rate: float,
                                       rng: jax.Array) -> jax.Array:
    """x + stochastic-depth residual, computing the residual only for the kept samples (DINOv2
    `layers/block.py` `drop_add_residual_stochastic_depth`): a random subset of max(int(b (1 - rate)), 1) of the
    b samples goes through `residual_fn` (a per-sample function, e.g. ls1(attn(norm1(.)))), and their residuals
    are added scaled by b / subset, the others unchanged -- each sample is kept with probability subset / b, so
    E[out] = x + residual_fn(x), as with DropPath, at (1 - rate) of the branch's FLOPs. `rate` is static (the
    subset size is a shape); the subset is drawn over the whole (global) batch."""
    b = x.shape[0]
    keep = max(int(b * (1.0 - rate)), 1)
    subset = jax.random.permutation(rng, b)[:keep]
    residual = residual_fn(x[subset])
    return x.at[subset].add((residual * (b / keep)).astype(x.dtype))


class TransformerBlock(nn.Module):
    """Pre-norm x + attn(LN(x)[, LN(x_kv)]), then x + mlp(LN(x)); or post-norm (`pre_norm=False`, BERT)
    LN(x + attn(x)), then LN(x + mlp(x)).

    With `relation_mask_ratio > 0` the attention is MRM's relation masking (Sec. 3.2.1): a self-modality
    block when `x_kv` is None, a cross-modality block when `x_kv` is given. Param names: `norm_names`
    (attention norm, MLP norm, x_kv norm), `attention_name`, and the MLP under `mlp_name` (None: its fc1/fc2
    directly in the block, the CLIP / BERT Hugging Face layout); LayerScale gammas "ls1"/"ls2" (timm).

    `drop_add_residual` (DINOv2 `Block.forward`): in training with a drop-path rate above 0.1 each residual
    branch runs on the kept samples only (`drop_add_residual_stochastic_depth`); at 0.1 or below, DropPath.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    layerscale_init: float | None = None  # CaiT LayerScale; None disables it
    relation_mask_ratio: float = 0.0
    kernel_impl: str = "auto"
    mlp_dim: int | None = None  # None: mlp_ratio * width
    activation: str = "gelu"  # an ACTIVATIONS name or "swiglu"
    mlp_bias_std: float = 1e-6  # ViT (big_vision) MLP bias init; CLIP/BERT: 0
    pre_norm: bool = True
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # dropout on each branch before its residual sum, in training (BERT)
    mlp_dropout: float = 0.0  # dropout on the MLP's hidden activations, in training (vit-pytorch FeedForward)
    head_dim: int | None = None  # attention head size; None: width // num_heads (ViSD's VQ-VAE: 16 x 64 at 768)
    qkv_bias: bool = True  # bias of the q/k/v projections (vit-pytorch `to_qkv` has none; the output keeps its)
    fused_attention: bool = True
    drop_add_residual: bool = False  # DINOv2's subset stochastic depth above rate 0.1 (class doc)
    sow_query_logits: bool = False  # MultiHeadAttention.sow_query_logits
    norm_names: tuple[str, str, str] = ("norm1", "norm2", "norm_kv")
    mlp_name: str | None = "mlp"
    attention_name: str = "attn"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _layer_scale(self, x: jax.Array, name: str) -> jax.Array:
        if self.layerscale_init is None:
            return x
        gamma = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.layerscale_init), ("embed",)), (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)

    def _subset_rate(self, drop_path_rate) -> float:
        """The static drop-path rate `drop_add_residual` needs (a traced per-layer rate cannot size a subset)."""
        rate = self.drop_path if drop_path_rate is None else drop_path_rate
        if not isinstance(rate, (int, float)):
            raise ValueError("medjax/nn/transformer.py TransformerBlock.drop_add_residual needs a static drop-path "
                             "rate: use a uniform schedule (drop_path_uniform) or unrolled blocks (scan=False)")
        return float(rate)

    def _mlp(self, x: jax.Array, train: bool) -> jax.Array:
        mlp_dim = self.mlp_dim or int(self.mlp_ratio * x.shape[-1])
        if self.mlp_name is None:
            return mlp(self, x, mlp_dim, self.activation, self.mlp_bias_std, self.dtype, self.param_dtype,
                       dropout=self.mlp_dropout, train=train)
        return Mlp(mlp_dim, self.activation, self.mlp_bias_std, self.dtype, self.param_dtype, self.mlp_dropout,
                   name=self.mlp_name)(x, train=train)

    @nn.compact
    def __call__(self, x: jax.Array, x_kv: jax.Array | None = None, *, mask: jax.Array | None = None,
                 train: bool = False, drop_path_rate: jax.Array | float | None = None,
                 relation_mask_ratio: float | None = None) -> jax.Array:
        """`relation_mask_ratio` (static): this call's MRM ratio instead of the field's, same params (MRM's
        masking inside an encoder's own layers, `medjax.models.mrm.MRM.mask_layers`)."""
        x = nn.with_logical_constraint(x, TOKENS)
        norm = lambda i: layer_norm(  # noqa: E731
            self.dtype, self.param_dtype, self.norm_names[i], eps=self.layer_norm_eps)
        ratio = self.relation_mask_ratio if relation_mask_ratio is None else float(relation_mask_ratio)
        attention = MultiHeadAttention(self.num_heads, head_dim=self.head_dim, qkv_bias=self.qkv_bias,
                                       relation_mask_ratio=ratio,
                                       kernel_impl=self.kernel_impl, dropout_rate=self.attention_dropout,
                                       fused=self.fused_attention, sow_query_logits=self.sow_query_logits,
                                       dtype=self.dtype, param_dtype=self.param_dtype, name=self.attention_name)

        def drop(y, i):
            y = DropPath(self.drop_path, name=f"drop_path{i}")(self._layer_scale(y, f"ls{i}"), train=train,
                                                                  rate=drop_path_rate)
            return nn.Dropout(self.hidden_dropout)(y, deterministic=not train) if self.hidden_dropout else y
        if x_kv is not None:
            x_kv = nn.with_logical_constraint(x_kv, TOKENS)
        if train and self.drop_add_residual and self._subset_rate(drop_path_rate) > 0.1:  # DINOv2's threshold
            if x_kv is not None or mask is not None or not self.pre_norm:
                raise ValueError("medjax/nn/transformer.py TransformerBlock.drop_add_residual: only for pre-norm "
                                 "self-attention blocks without a mask (DINOv2's Block)")
            rate = self._subset_rate(drop_path_rate)

            def branch(fn, i):
                def residual(y):
                    y = self._layer_scale(fn(y), f"ls{i}")
                    return nn.Dropout(self.hidden_dropout)(y, deterministic=False) if self.hidden_dropout else y
                return residual
            attn_branch = branch(lambda y: attention(norm(0)(y), train=train), 1)
            x = drop_add_residual_stochastic_depth(x, attn_branch, rate, self.make_rng("dropout"))
            x = drop_add_residual_stochastic_depth(x, branch(lambda y: self._mlp(norm(1)(y), train), 2), rate,
                                                   self.make_rng("dropout"))
            return nn.with_logical_constraint(x, TOKENS)
        if self.pre_norm:
            kv = None if x_kv is None else norm(2)(x_kv)
            x = x + drop(attention(norm(0)(x), kv, mask, train=train), 1)
            x = x + drop(self._mlp(norm(1)(x), train), 2)
        else:
            x = norm(0)(x + drop(attention(x, x_kv, mask, train=train), 1))
            x = norm(1)(x + drop(self._mlp(x, train), 2))
        return nn.with_logical_constraint(x, TOKENS)

