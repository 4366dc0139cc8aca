"""DINOv2 student/teacher network (Oquab et al., TMLR 2024; `dinov2/train/ssl_meta_arch.py`), the
pretraining of UNI (Chen et al., Nat. Med. 2024: ViT-L/16, the "ViT-L/16 short" recipe).

`DINOv2Network` = backbone (`medjax.nn.vit.ViTEncoder` with LayerScale, iBOT mask token, registers,
position embeddings resized for the 96-px local crops) + `DINOHead` (+ an iBOT head when not shared;
UNI/DINOv2 share it). Student and teacher are two parameter sets of the same network: the teacher is
an EMA of the student (`ema_update`), sees only the 2 global crops, unmasked; the student sees the
global crops with iBOT masks and the local crops. Crops are flattened sample-major ((B, C, ...) ->
(B * C, ...), `flatten_crops`), which keeps a batch-sharded array sharded without moving images;
`per_crop` regroups outputs (B * C, ...) -> (C, B, ...) for the losses (DINOv2 collates crop-major).

The masked patch tokens go through the head from a fixed-size buffer (`masked_token_index`): the
first `num_masked` rows are the masked patches in order, the rest padding with weight 0 -- DINOv2's
`upperbound` buffer with a static size for `jax.jit`.

DINOv2's parameter groups (`dinov2/utils/param_groups.py`: layer-wise lr decay, no decay on biases,
norms and LayerScale, the frozen last layer) are config rules of medjax.optim (experiments/uni_vitl16.py).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.vit import ViTEncoder

Dtype = Any


class WeightNormDense(nn.Module):
    """Weight-normalised linear layer without bias (Salimans & Kingma 2016): y = x (g * v / ||v||), the
    norm over the inputs of each output unit (torch `weight_norm(nn.Linear)`, dim 0). DINOv2 fills g
    with 1; `learn_gain=False` keeps it at 1 (the reference recipe, DINO's `norm_last_layer`), True
    makes it a parameter as DINOv2's code leaves it. `gain_init` is g's value (fixed or initial); 1 in DINO
    and DINOv2."""

    features: int
    learn_gain: bool = False
    gain_init: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch nn.Linear's default init (kaiming_uniform, a = sqrt(5)) = uniform(+-1/sqrt(fan_in))
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        v = self.param("kernel", nn.with_logical_partitioning(init, (None, "vocab")), (x.shape[-1], self.features),
                       self.param_dtype)
        v = jnp.asarray(v, jnp.float32)
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if self.learn_gain:
            init = nn.initializers.constant(self.gain_init)
            gain = self.param("gain", nn.with_logical_partitioning(init, ("vocab",)), (self.features,), self.param_dtype)
            w = w * jnp.asarray(gain, jnp.float32)
        elif self.gain_init != 1.0:
            w = w * self.gain_init
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the rows it is given (Ioffe & Szegedy 2015; torch BatchNorm1d in
    training mode, eps 1e-5, biased variance): (x - mean) / sqrt(var + eps) * scale + bias over axis 0. No running
    averages: the DINO head only runs in training (DINO v1 keeps student and teacher in train mode); the features
    evaluated are the backbone's. Over a sharded batch the mean is global (SyncBatchNorm, as DINO v1 converts)."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("mlp",)), (features,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)), (features,),
                          self.param_dtype)
        x32 = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x32, axis=0, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=0, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
        return y.astype(x.dtype)


class DINOHead(nn.Module):
    """DINO projection head (DINOv2 `DINOHead`): Linear(D, hidden)-GELU-[Linear(hidden, hidden)-GELU]*
    (num_layers - 2)-Linear(hidden, bottleneck), L2-normalise, weight-normalised Linear(bottleneck,
    out_dim, no bias). Full recipe: hidden 2048, bottleneck 256, 3 layers, 65536 prototypes.

    `use_bn`: DINO v1's `use_bn_in_head` (Caron et al. 2021, `main_dino.py` / `vision_transformer.py` DINOHead):
    BatchNorm1d after each hidden Linear, before the GELU (`BatchStatNorm`, over the rows of one call)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    learn_gain: bool = False
    gain_init: float = 1.0
    use_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"medjax/models/dinov2.py DINOHead: num_layers={self.num_layers} must be >= 1")
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        axes = [("embed", "mlp")] + [(None, "mlp")] * (self.num_layers - 2) + [("mlp", None)]
        if self.num_layers == 1:
            axes = [("embed", None)]
        x = x.astype(self.dtype)
        for i, (width, kernel_axes) in enumerate(zip(widths, axes)):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"mlp_{i}",
                         kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), kernel_axes),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), kernel_axes[1:]))(x)
            if i < len(widths) - 1:
                if self.use_bn:
                    x = BatchStatNorm(param_dtype=self.param_dtype, name=f"batch_norm_{i}")(x)
                x = nn.gelu(x, approximate=False)
        x = jnp.asarray(x, jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize, eps 1e-12
        return WeightNormDense(self.out_dim, self.learn_gain, self.gain_init, self.dtype, self.param_dtype,
                               name="last_layer")(x)


class DINOv2Network(nn.Module):
    """Backbone ("backbone") + DINO head ("dino_head") [+ "ibot_head" when `ibot_separate_head`]."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layerscale_init: float | None = 1e-5
    drop_path: float = 0.3
    drop_path_uniform: bool = True
    drop_add_residual: bool = False  # DINOv2's subset stochastic depth (nn.transformer.drop_add_residual_stochastic_depth)
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    remat: bool | str = "none"  # the backbone's blocks (ViTEncoder.remat)
    scan: bool | str | None = None  # nn.scan the backbone's blocks (None: depth >= 12; ViTEncoder.scan)
    head_out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    head_learn_gain: bool = False
    head_gain_init: float = 1.0
    head_use_bn: bool = False  # the DINO head only (DINO v1 use_bn_in_head); needs ibot_separate_head
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone = ViTEncoder(
            self.image_size, self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
            class_token=True, drop_path=self.drop_path, layerscale_init=self.layerscale_init, remat=self.remat,
            scan=self.scan,
            num_register_tokens=self.num_register_tokens, use_mask_token=True, drop_path_uniform=self.drop_path_uniform,
            drop_add_residual=self.drop_add_residual,
            dynamic_image_size=True, interpolate_offset=self.interpolate_offset,
            interpolate_antialias=self.interpolate_antialias, **kinds)
        head = dict(hidden_dim=self.head_hidden_dim, bottleneck_dim=self.head_bottleneck_dim,
                    num_layers=self.head_layers, learn_gain=self.head_learn_gain, gain_init=self.head_gain_init, **kinds)
        if self.head_use_bn and not self.ibot_separate_head:
            raise ValueError("medjax/models/dinov2.py DINOv2Network: head_use_bn (head.use_bn) needs a separate iBOT "
                             "head (ibot.separate_head=True): a shared head's rows mix class tokens and padded patch "
                             "tokens, so batch statistics over them would be wrong")
        self.dino_head = DINOHead(self.head_out_dim, use_bn=self.head_use_bn, **head)
        if self.ibot_separate_head:
            self.ibot_head = DINOHead(self.ibot_out_dim, **head)

    def features(self, images: jax.Array, masks: jax.Array | None = None, *, train: bool = False) -> dict:
        """Backbone outputs after the final norm: "cls_token" (B, D), "patch_tokens" (B, N, D), ..."""
        return self.backbone.features(images, masks, train=train)

    def head(self, x: jax.Array) -> jax.Array:
        return self.dino_head(x)

    def patch_head(self, x: jax.Array) -> jax.Array:
        """The iBOT head: the DINO head unless `ibot_separate_head`."""
        return self.ibot_head(x) if self.ibot_separate_head else self.dino_head(x)

    def __call__(self, global_crops: jax.Array, local_crops: jax.Array, masks: jax.Array, *,
                 train: bool = False) -> dict:
        """Every part once (for init): global crops with masks, local crops, both heads."""
        g = self.features(global_crops, masks, train=train)
        local = self.features(local_crops, train=train)
        return {"global": self.head(g["cls_token"]), "local": self.head(local["cls_token"]),
                "patches": self.patch_head(g["patch_tokens"][:, 0])}


def flatten_crops(x: jax.Array) -> jax.Array:
    """(B, C, ...) crops per sample -> (B * C, ...), sample-major (a reshape: batch sharding is kept)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def per_crop(x: jax.Array, crops: int) -> jax.Array:
    """Outputs of `flatten_crops` inputs (B * C, ...) -> (C, B, ...): crop c of every sample together."""
    return jnp.swapaxes(x.reshape((x.shape[0] // crops, crops) + x.shape[1:]), 0, 1)


def masked_token_index(masks: jax.Array, buffer_size: int) -> dict[str, jax.Array]:
    """Masks (images, N) bool -> a static buffer of `buffer_size` masked-patch slots: "index" into the
    flattened (images * N) patch tokens, "weight" 1 / (masked patches of the slot's image) (0 on
    padding), "valid" bool, "num_masked" scalar (DINOv2 `mask_indices_list` / `masks_weight`)."""
    images, n = masks.shape
    flat = masks.reshape(-1)
    (index,) = jnp.nonzero(flat, size=buffer_size, fill_value=0)
    num_masked = jnp.sum(flat)
    valid = jnp.arange(buffer_size) < num_masked
    per_image = jnp.maximum(jnp.sum(masks, axis=1), 1).astype(jnp.float32)
    weight = jnp.where(valid, 1.0 / per_image[index // n], 0.0)
    return {"index": index, "weight": weight, "valid": valid, "num_masked": num_masked}


def _gather_tokens(patch_tokens: jax.Array, index: jax.Array) -> jax.Array:
    return patch_tokens.reshape(-1, patch_tokens.shape[-1])[index]


def teacher_forward(model: DINOv2Network, params: Any, global_crops: jax.Array, index: jax.Array) -> dict:
    """Teacher (eval mode, no masks) on the global crops (2B, H, W, 3) (`flatten_crops`): "cls_logits" (2B, K),
    "patch_logits" (U, K) at the masked positions `index` of the student's masks."""
    out = model.apply({"params": params}, global_crops, train=False, method=DINOv2Network.features)
    masked = _gather_tokens(out["patch_tokens"], index)
    if model.ibot_separate_head:
        cls_logits = model.apply({"params": params}, out["cls_token"], method=DINOv2Network.head)
        patch_logits = model.apply({"params": params}, masked, method=DINOv2Network.patch_head)
    else:  # one head call on [cls; masked patches], as DINOv2
        both = model.apply({"params": params}, jnp.concatenate([out["cls_token"], masked]), method=DINOv2Network.head)
        cls_logits, patch_logits = both[:out["cls_token"].shape[0]], both[out["cls_token"].shape[0]:]
    return {"cls_logits": cls_logits, "patch_logits": patch_logits}


def student_forward(model: DINOv2Network, params: Any, global_crops: jax.Array, local_crops: jax.Array,
                    masks: jax.Array, index: jax.Array, rng: jax.Array, *, train: bool = True) -> dict:
    """Student on the masked global crops (2B, ...) and the local crops (LB, ...) (`flatten_crops`):
    "global_logits" (2B, K), "local_logits" (LB, K), "patch_logits" (U, K), "global_cls" (2B, D)
    (backbone CLS after the norm, pre-head: KoLeo's input)."""
    rng_global, rng_local = jax.random.split(rng)
    g = model.apply({"params": params}, global_crops, masks, train=train, rngs={"dropout": rng_global},
                    method=DINOv2Network.features)
    local = model.apply({"params": params}, local_crops, train=train, rngs={"dropout": rng_local},
                        method=DINOv2Network.features)
    masked = _gather_tokens(g["patch_tokens"], index)
    n_local, n_global = local["cls_token"].shape[0], g["cls_token"].shape[0]
    if model.ibot_separate_head:
        cls = model.apply({"params": params}, jnp.concatenate([local["cls_token"], g["cls_token"]]),
                          method=DINOv2Network.head)
        patch_logits = model.apply({"params": params}, masked, method=DINOv2Network.patch_head)
    else:
        rows = jnp.concatenate([local["cls_token"], g["cls_token"], masked])
        cls = model.apply({"params": params}, rows, method=DINOv2Network.head)
        patch_logits = cls[n_local + n_global:]
    return {"local_logits": cls[:n_local], "global_logits": cls[n_local:n_local + n_global],
            "patch_logits": patch_logits, "global_cls": g["cls_token"]}


def ema_update(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
    """teacher <- m * teacher + (1 - m) * student, leaf by leaf (DINOv2 `update_teacher`)."""
    return jax.tree.map(lambda t, s: (t * momentum + s * (1.0 - momentum)).astype(t.dtype), teacher, student)


# ---- DINOv2 parameter groups (dinov2/utils/param_groups.py) from a parameter's path ----------------
