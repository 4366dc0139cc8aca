"""CLIP-Driven Universal Model for organ segmentation and tumour detection (Liu et al., ICCV 2023,
arXiv 2301.00785, Sec. 3; the original's `model/Universal_model.py`).

    dec4, out = backbone(x)                                  # Swin UNETR: 768 ch @ 1/32, 48 ch @ full res
    f_image   = GAP(dec4)        GroupNorm(16) -> ReLU -> global average pool -> 1x1x1 conv C -> 256
    f_text    = ReLU(text_to_vision(w_k))                  # w_k: frozen CLIP text embedding of class k (512)
    theta_k   = controller(concat[f_image, f_text_k])        # 1x1x1 conv 512 -> 153, image first (Sec. 3.2)
    F         = precls_conv(out) GroupNorm(16) -> ReLU -> 1x1x1 conv C -> 8
    P_k       = Sigmoid(((F * theta_k1) * theta_k2) * theta_k3)   # Eq. 2, the dynamic head; sigmoid outside

`UniversalModel.__call__(x)` maps x (batch, X, Y, Z, 1) to the raw logits (batch, X, Y, Z, 32), the
original's output with channels last. The dynamic head runs through `medjax.kernels.dynamic_conv3d.
dynamic_head` (`kernel_impl` = config `kernels.impl`), which splits each theta_k in the original's
order (weights 64 + 64 + 8, then biases 8 + 8 + 1).

Text embeddings (`encoding`):
- "word_embedding" (the paper): the 32 x 512 CLIP text features are a frozen constant in the variable
  collection "constants" (`{"constants": {"organ_embedding": (32, 512)}}`), passed in at apply time,
  never a param, behind a stop_gradient; `python -m medjax.convert embed-classes` computes
  them from a local Hugging Face CLIP directory.
- "rand_embedding" (the original's ablation): a learned param `organ_embedding` (32, 256), used as
  f_text directly (no text_to_vision, no ReLU), as in the original.

Param tree (names follow the released checkpoint's modules, `module.<name>.*`):
    backbone/...                                   the Swin UNETR / UNet3D backbone
    precls_conv/norm/{scale, bias}, precls_conv/conv/{kernel (1,1,1,C,8), bias}
    GAP/norm/{scale, bias}, GAP/conv/{kernel (1,1,1,C4,256), bias}
    controller/{kernel (1,1,1,512,153), bias}
    text_to_vision/{kernel (512,256), bias}        word_embedding only
    organ_embedding (32, 256)                      rand_embedding only
Conv kernels are PyTorch Conv3d weights transposed (2, 3, 4, 1, 0); Dense kernels Linear weights .T.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.ontology import universal_classes as templates
from medjax.kernels.dynamic_conv3d import CHANNELS, PARAMS_PER_CLASS, dynamic_head

Dtype = Any
NUM_CLASSES = templates.NUM_CLASSES
TEXT_DIM = 512  # CLIP ViT-B/32 text features
EMBED_DIM = 256  # f_image and f_text width; the controller sees 2 x 256
ENCODINGS = ("word_embedding", "rand_embedding")
BACKBONES = ("swinunetr", "unet")
CONSTANTS = "constants"  # variable collection of the frozen text embeddings
_WHERE = "medjax/models/universal.py"


def _conv1(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    """A 1x1x1 Conv3d (kernel (1, 1, 1, in, out)), PyTorch's default init family."""
    return nn.Conv(features, (1, 1, 1), dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, None, "channels", None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))


def _group_norm(groups: int, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
    """torch.nn.GroupNorm(groups, C) (eps 1e-5, affine) over channels-last volumes."""
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name="norm",
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)))


class PreClassifier(nn.Module):
    """precls_conv: GroupNorm(16, C) -> ReLU -> 1x1x1 conv C -> 8, the dynamic head's input F."""

    groups: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, out: jax.Array) -> jax.Array:
        x = nn.relu(_group_norm(self.groups, self.dtype, self.param_dtype)(out))
        return _conv1(CHANNELS, self.dtype, self.param_dtype, "conv")(x)


class GlobalImageFeature(nn.Module):
    """GAP: GroupNorm(16, C) -> ReLU -> global average pool -> 1x1x1 conv C -> 256: f_image (b, 256)."""

    groups: int = 16
    features: int = EMBED_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, dec4: jax.Array) -> jax.Array:
        x = nn.relu(_group_norm(self.groups, self.dtype, self.param_dtype)(dec4))
        x = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        return _conv1(self.features, self.dtype, self.param_dtype, "conv")(x)[:, 0, 0, 0]


class UniversalModel(nn.Module):
    """The CLIP-Driven Universal Model (module docstring) on a given backbone.

    backbone: a module mapping x (b, X, Y, Z, 1) to (dec4 (b, X/32, Y/32, Z/32, C4), out (b, X, Y, Z, C)),
    e.g. `medjax.nn.swin_unetr.SwinUNETRBackbone` or `medjax.nn.unet3d.UNet3DBackbone`.
    norm_groups: GroupNorm groups of precls_conv and GAP (16 in the paper; must divide C and C4).
    """

    backbone: nn.Module
    num_classes: int = NUM_CLASSES
    encoding: str = "word_embedding"
    text_dim: int = TEXT_DIM
    norm_groups: int = 16
    kernel_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def class_features(self) -> jax.Array:
        """f_text (classes, 256): ReLU(text_to_vision(frozen CLIP embeddings)) or the learned embedding."""
        if self.encoding == "rand_embedding":
            return self.param("organ_embedding", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("classes", None)), (self.num_classes, EMBED_DIM), self.param_dtype)
        if self.encoding != "word_embedding":
            raise ValueError(f"{_WHERE} UniversalModel.encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not self.is_initializing() and not self.has_variable(CONSTANTS, "organ_embedding"):
            raise ValueError(f"{_WHERE} UniversalModel: encoding='word_embedding' needs the frozen class text "
                             f"embeddings as variables['{CONSTANTS}']['organ_embedding'] of shape "
                             f"({self.num_classes}, {self.text_dim}) (see `embed-classes`), or "
                             "encoding='rand_embedding'")
        shape = (self.num_classes, self.text_dim)
        embedding = self.variable(CONSTANTS, "organ_embedding",  # init only: the original's torch.randn buffer
                                  lambda: jax.random.normal(self.make_rng("params"), shape, self.param_dtype)).value
        if embedding.shape != (self.num_classes, self.text_dim):
            raise ValueError(f"{_WHERE} UniversalModel: variables['{CONSTANTS}']['organ_embedding'] must be "
                             f"({self.num_classes}, {self.text_dim}), got {embedding.shape}")
        embedding = jax.lax.stop_gradient(embedding.astype(self.dtype))  # frozen (Sec. 3.2)
        return nn.relu(nn.Dense(EMBED_DIM, dtype=self.dtype, param_dtype=self.param_dtype, name="text_to_vision",
                                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                         ("embed", None)),
                                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(
            embedding))

    def dynamic_params(self, image_feature: jax.Array, class_feature: jax.Array) -> jax.Array:
        """theta (b, classes, 153) = controller(concat[f_image, f_text_k]) per (sample, class), image first."""
        b, k = image_feature.shape[0], class_feature.shape[0]
        cond = jnp.concatenate([jnp.broadcast_to(image_feature[:, None], (b, k, image_feature.shape[-1])),
                                jnp.broadcast_to(class_feature[None].astype(image_feature.dtype),
                                                 (b, k, class_feature.shape[-1]))], axis=-1)
        theta = _conv1(PARAMS_PER_CLASS, self.dtype, self.param_dtype, "controller")(cond[:, :, None, None, :])
        return theta[:, :, 0, 0, :]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 5 or x.shape[-1] != 1:
            raise ValueError(f"{_WHERE} UniversalModel: x must be (batch, X, Y, Z, 1), got {x.shape}")
        x = nn.with_logical_constraint(x, ("batch", None, None, None, None))
        dec4, out = self.backbone(x.astype(self.dtype), train=train)
        image_feature = GlobalImageFeature(self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                                           name="GAP")(dec4)
        theta = self.dynamic_params(image_feature, self.class_features())
        head_input = PreClassifier(self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="precls_conv")(out)
        logits = dynamic_head(head_input.astype(jnp.float32), theta.astype(jnp.float32), impl=self.kernel_impl)
        return nn.with_logical_constraint(logits, ("batch", None, None, None, None))


def make_backbone(name: str, *, feature_size: int = 48, legacy_merging: bool = True, remat: bool | str = False,
                  window_size: int = 7, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Module:
    """The backbone module for `name` ("swinunetr": Swin UNETR at `feature_size` and attention `window_size`, 7 in
    the paper; "unet": UNet3D)."""
    if name == "swinunetr":
        from medjax.nn.swin_unetr import SwinUNETRBackbone

        return SwinUNETRBackbone(feature_size=feature_size, window_size=window_size, legacy_merging=legacy_merging,
                                 remat=remat, dtype=dtype, param_dtype=param_dtype)
    if name == "unet":
        from medjax.nn.unet3d import UNet3DBackbone

        return UNet3DBackbone(dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"{_WHERE} make_backbone: backbone must be one of {BACKBONES}, got {name!r}")


def _remat(value: Any) -> bool | str:
    """model.remat: a bool or a policy name of `medjax.nn.swin_unetr.REMAT_POLICIES` ("none", "swin", "all")."""
    from medjax.nn.swin_unetr import remat_policy

    return remat_policy(value if isinstance(value, bool) else str(value), f"{_WHERE} universal_from_config model.remat")


def universal_from_config(model_cfg: Any) -> UniversalModel:
    """A UniversalModel from an experiment's `model` block: backbone, feature_size, window_size (default 7),
    legacy_merging, remat, encoding, norm_groups, num_classes, dtype, kernel_impl (`param_dtype` float32); other keys (e.g.
    class_embeddings, read by the task) are ignored."""
    from medjax.dtypes import parse_dtype

    cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    dtype = parse_dtype(cfg.get("dtype", "float32"), f"{_WHERE} universal_from_config model.dtype")
    backbone = make_backbone(cfg.get("backbone", "swinunetr"), feature_size=int(cfg.get("feature_size", 48)),
                             window_size=int(cfg.get("window_size", 7)), legacy_merging=bool(cfg.get("legacy_merging", True)),
                             remat=_remat(cfg.get("remat", False)), dtype=dtype)
    return UniversalModel(backbone=backbone, num_classes=int(cfg.get("num_classes", NUM_CLASSES)),
                          encoding=cfg.get("encoding", "word_embedding"), norm_groups=int(cfg.get("norm_groups", 16)),
                          kernel_impl=cfg.get("kernel_impl", "auto"), dtype=dtype)


# ---- Class text embeddings (the original's `pretrained_weights/clip_embedding.py`) -------------------

def class_prompts() -> list[str]:
    """The 32 prompts "A computerized tomography of a [CLS]", with the original's spellings."""
    return [templates.PROMPT_TEMPLATE.format(name) for name in templates.PROMPT_NAMES]


def load_class_embeddings(path: str, num_classes: int = NUM_CLASSES, text_dim: int = TEXT_DIM) -> np.ndarray:
    """The (num_classes, text_dim) float32 array of a .npy file, checked."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read class embeddings as .npy ({error}); make them with "
                         "`python -m medjax.convert embed-classes --clip DIR --out FILE.npy`") from error
    if array.shape != (num_classes, text_dim) or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: class embeddings must be a float ({num_classes}, {text_dim}) array, got "
                         f"{array.dtype}{array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: class embeddings hold non-finite values")
    return array.astype(np.float32)
