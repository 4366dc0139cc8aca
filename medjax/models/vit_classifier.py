"""ViT image classifier for fine-tuning a pre-trained encoder (MAE fine-tuning, He et al., CVPR 2022,
Sec. 4 / Appendix A.1: global average pooling over patch tokens, then LayerNorm, then a linear
head initialised with std 2e-5; or the class token of ViT, Dosovitskiy et al., ICLR 2021, Eq. 4).

The encoder submodule is named `encoder` and has the fields of `MRM.image_encoder`, so MRM's
pre-trained `params["image_encoder"]` load as `params["encoder"]` unchanged.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.vit import ViTEncoder, layer_norm

Dtype = Any


class ViTClassifier(nn.Module):
    """ViTEncoder -> pooled feature -> Dense(num_classes); returns logits (batch, num_classes) in float32."""

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = True
    drop_path: float = 0.0
    remat: bool | str = "none"  # the encoder's blocks: "none" | "full" | "dots_saveable" (True = "full")
    scan: bool | str | None = None  # nn.scan the encoder's blocks (None: depth >= 12; ViTEncoder.scan)
    pooling: str = "mean"  # "mean": patch tokens + LayerNorm (MAE); "cls": the class token
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"medjax/models/vit_classifier.py ViTClassifier.pooling must be 'mean' or 'cls', "
                             f"got {self.pooling!r}")
        if self.pooling == "cls" and not self.class_token:
            raise ValueError("medjax/models/vit_classifier.py ViTClassifier: pooling='cls' needs class_token=True")
        tokens = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads,
                            self.mlp_ratio, class_token=self.class_token, drop_path=self.drop_path,
                            remat=self.remat, scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="encoder")(images, train=train)
        if self.pooling == "cls":
            feature = tokens[:, 0]
        else:
            patches = tokens[:, 1:] if self.class_token else tokens
            feature = layer_norm(self.dtype, self.param_dtype, "fc_norm")(jnp.mean(patches, axis=1))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                          kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(2e-5),
                                                                   ("embed", "classes")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)))(feature)
        return logits.astype(jnp.float32)
