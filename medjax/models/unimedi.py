"""UniMedI (He et al., "Unified Medical Image Pre-training in Language-Guided Common Semantic Space",
ECCV 2024): 2D X-rays and 3D CT volumes in one ViT, aligned through their reports.

- One shared vision encoder E_v (`medjax.nn.vit.ViTEncoder`, ViT-B/16) with two tokenizers: T_2D, the
  ViT's own 16x16 patch embedding and position embedding, and T_3D, a 3D patch embedding over (slices,
  H, W) (4x16x16 by default) with its own learned position embedding. Both share the [CLS] token.
- Attentive slice selection (Sec. 3.2, 3D only): v = 1/(H L) sum_l sum_h softmax(q_lh([CLS]) K_lh(patches)^T
  / sqrt(C)) over the volume's patch tokens (`attentive_slice_scores`); slice score s_i = the mean of v over
  the patches of slice i; the k highest-scoring slices (`select_slices`) become 2D images whose T_2D patch
  tokens are appended to the volume's T_3D tokens, one sequence through E_v ("pseudo pairs"). With 3D
  patches of depth d, "slice i" is the slab of d CT slices a patch row covers; its centre CT slice is the
  2D image (our choice: the paper does not say which slice of a slab; `slice_offset` moves it).
- Report encoder E_l: a BERT-family encoder (`medjax.nn.bert.BertEncoder`, BioClinicalBERT converted by
  `medjax.convert.hf.load`), its [CLS] state projected to the shared width; the image [CLS] likewise.
- Self-distillation: a DINO head (`medjax.models.dinov2.DINOHead`) on the [CLS] (L_icl) and on masked
  patch tokens (L_pcl, iBOT); the task keeps an EMA teacher of `vision` + `dino_head`.

Token layout of a 3D sample: [CLS, T_3D tokens (slice-major: patch p lies in slab p // (N_3D / slabs)),
T_2D tokens of selected slice 1, ..., of slice k]; of a 2D sample: [CLS, T_2D tokens].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.nn.transformer import TOKENS
from medjax.nn.transformer_layout import layer_intermediates
from medjax.nn.vit import ViTEncoder

Dtype = Any


def attentive_slice_scores(cls_attention: jax.Array, num_slices: int) -> jax.Array:
    """UniMedI Sec. 3.2: (layers, batch, heads, patches) softmax attention of [CLS] to the volume's patch
    tokens (slice-major) -> (batch, num_slices) float32, s_i = mean over slice i's patches of the mean
    over layers and heads (v = 1/(H L) sum_l sum_h A_lh; s_i = 1/N sum_j v_ij)."""
    if cls_attention.ndim != 4:
        raise ValueError(f"medjax/models/unimedi.py attentive_slice_scores: cls_attention must be (layers, batch, "
                         f"heads, patches), got shape {cls_attention.shape}")
    layers, batch, heads, patches = cls_attention.shape
    if num_slices < 1 or patches % num_slices:
        raise ValueError(f"medjax/models/unimedi.py attentive_slice_scores: {patches} patches do not split into "
                         f"num_slices={num_slices} equal slices")
    v = jnp.mean(jnp.asarray(cls_attention, jnp.float32), axis=(0, 2))  # (batch, patches)
    return jnp.mean(v.reshape(batch, num_slices, patches // num_slices), axis=-1)


def select_slices(scores: jax.Array, k: int) -> jax.Array:
    """(batch, slices) scores -> (batch, k) int32 indices of the k highest, highest first, ties to the lower
    index (`jax.lax.top_k`'s order); k is static."""
    if scores.ndim != 2 or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"medjax/models/unimedi.py select_slices: need scores (batch, slices) and 1 <= k <= slices; "
                         f"got shape {scores.shape} and k={k}")
    _, index = jax.lax.top_k(jnp.asarray(scores, jnp.float32), k)
    return index.astype(jnp.int32)


class VolumePatchEmbed(nn.Module):
    """T_3D's projection: a 3D conv with kernel = stride = `patch` over (slices, H, W), (B, D, H, W, C) ->
    (B, D/d * H/p * W/p, width), slice-major."""

    patch: tuple[int, int, int]
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, self.patch, strides=self.patch, padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, None, "channels", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                    name="proj")(volume)
        return x.reshape(x.shape[0], -1, self.width)


class UniMedIVision(nn.Module):
    """E_v with T_2D and T_3D. `image_size`: the 2D images' side (T_2D's position grid; other sizes, e.g. CT
    slices, are resized bicubically); `volume_shape`: (slices, H, W) of the 3D input; `volume_patch`: T_3D's
    patch (slices, H, W)."""

    image_size: int = 224
    patch_size: int = 16
    volume_shape: tuple[int, int, int] = (32, 224, 224)
    volume_patch: tuple[int, int, int] = (4, 16, 16)
    image_channels: int = 3  # 2D input channels; a CT slice is repeated to this many
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    scan: bool | str | None = None
    remat: bool | str = "none"
    slice_offset: int | None = None  # which CT slice of a slab becomes its 2D image; None: the centre
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        for name, (size, patch) in {"slices": (self.volume_shape[0], self.volume_patch[0]),
                                    "height": (self.volume_shape[1], self.volume_patch[1]),
                                    "width": (self.volume_shape[2], self.volume_patch[2])}.items():
            if size % patch:
                raise ValueError(f"medjax/models/unimedi.py UniMedIVision: volume {name} {size} is not a multiple of "
                                 f"its patch {patch} (volume_shape={self.volume_shape}, volume_patch={self.volume_patch})")
        self.encoder = ViTEncoder(
            self.image_size, self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
            class_token=True, drop_path=self.drop_path, remat=self.remat, scan=self.scan, use_mask_token=True,
            dynamic_image_size=True, interpolate_offset=0.0, sow_cls_logits=True, dtype=self.dtype,
            param_dtype=self.param_dtype)
        self.volume_embed = VolumePatchEmbed(tuple(self.volume_patch), self.width, self.dtype, self.param_dtype)
        self.volume_pos_embed = self.param(
            "volume_pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.num_volume_patches, self.width), self.param_dtype)

    @property
    def num_slabs(self) -> int:
        return self.volume_shape[0] // self.volume_patch[0]

    @property
    def num_volume_patches(self) -> int:
        return self.num_slabs * (self.volume_shape[1] // self.volume_patch[1]) * (self.volume_shape[2] // self.volume_patch[2])

    def _check_volume(self, volume: jax.Array) -> None:
        if volume.ndim != 5 or tuple(volume.shape[1:4]) != tuple(self.volume_shape):
            raise ValueError(f"medjax/models/unimedi.py UniMedIVision: expected volumes (batch, {self.volume_shape[0]}, "
                             f"{self.volume_shape[1]}, {self.volume_shape[2]}, channels), got {volume.shape}")

    def image_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """T_2D: (B, H, W, C) -> (B, 1 + N_2D, width), [CLS] first, position embeddings added; `masks` (B, N_2D)
        replace those patch embeddings by the mask token."""
        return self.encoder.embed(images, masks)

    def volume_tokens(self, volume: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """T_3D: (B, D, H, W, C) -> (B, 1 + N_3D, width), [CLS] first (the shared token and its position)."""
        self._check_volume(volume)
        x = self.volume_embed(volume.astype(self.dtype))
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"medjax/models/unimedi.py volume_tokens: masks must be (batch, {x.shape[1]}), "
                                 f"got {masks.shape}")
            x = jnp.where(masks[..., None], self.encoder.mask_token.astype(x.dtype)[None], x)
        x = x + self.volume_pos_embed.astype(x.dtype)
        cls = (self.encoder.cls_token + self.encoder.pos_embed[:, :1]).astype(x.dtype)
        cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.width))
        return nn.with_logical_constraint(jnp.concatenate([cls, x], axis=1), TOKENS)

    def slice_images(self, volume: jax.Array, slabs: jax.Array) -> jax.Array:
        """The 2D images of the selected slabs (B, k) int: (B, k, H, W, image_channels), one CT slice each."""
        self._check_volume(volume)
        offset = self.volume_patch[0] // 2 if self.slice_offset is None else self.slice_offset
        index = slabs * self.volume_patch[0] + offset  # (B, k)
        slices = jnp.take_along_axis(volume, index[:, :, None, None, None], axis=1)
        reps = self.image_channels // slices.shape[-1] if self.image_channels % slices.shape[-1] == 0 else None
        if reps is None:
            raise ValueError(f"medjax/models/unimedi.py slice_images: {slices.shape[-1]} volume channels do not "
                             f"tile to image_channels={self.image_channels}")
        return jnp.tile(slices, (1, 1, 1, 1, reps))

    def pseudo_pair_tokens(self, volume: jax.Array, slabs: jax.Array, volume_masks: jax.Array | None = None,
                           slice_masks: jax.Array | None = None) -> jax.Array:
        """[CLS, T_3D(volume), T_2D(slice 1), ..., T_2D(slice k)] (B, 1 + N_3D + k N_2D, width); `slice_masks`
        (B, k * N_2D)."""
        tokens = self.volume_tokens(volume, volume_masks)
        images = self.slice_images(volume, slabs)
        b, k = images.shape[:2]
        flat = images.reshape((b * k,) + images.shape[2:])
        masks = None if slice_masks is None else slice_masks.reshape(b * k, -1)
        patches = self.image_tokens(flat, masks)[:, 1:]
        return jnp.concatenate([tokens, patches.reshape(b, -1, self.width)], axis=1)

    def encode(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """E_v's blocks and final norm on assembled tokens."""
        return self.encoder.encode(tokens, train=train)

    def __call__(self, images: jax.Array, volume: jax.Array, slabs: jax.Array, *, train: bool = False):
        """Both paths once (for init): (2D tokens, pseudo-pair tokens), encoded."""
        return (self.encode(self.image_tokens(images), train=train),
                self.encode(self.pseudo_pair_tokens(volume, slabs), train=train))


class UniMedI(nn.Module):
    """`vision` (UniMedIVision) + `text` (a BertEncoder) + linear projections to `embed_dim` + learnable
    temperature (CLIP: logit scale log(1 / 0.07), clamped at 100) + `dino_head` (DINOHead)."""

    vision: nn.Module
    text: nn.Module
    dino_head: nn.Module
    embed_dim: int = 512
    init_temperature: float = 0.07
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        dense = lambda name, axes: nn.Dense(  # noqa: E731
            self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))
        self.image_projection = dense("image_projection", ("embed", None))
        self.text_projection = dense("text_projection", ("embed", None))
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1.0 / self.init_temperature)),
                                      (), jnp.float32)

    def encode_images(self, images: jax.Array, masks: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        return self.vision.encode(self.vision.image_tokens(images, masks), train=train)

    def encode_volumes(self, volume: jax.Array, slabs: jax.Array, volume_masks: jax.Array | None = None,
                       slice_masks: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        return self.vision.encode(self.vision.pseudo_pair_tokens(volume, slabs, volume_masks, slice_masks), train=train)

    def volume_cls_logits(self, volume: jax.Array) -> jax.Array:
        """E_v on the volume's [CLS, T_3D] tokens; sows every layer's [CLS] attention logits (read them with
        `cls_attention_from_intermediates`)."""
        return self.vision.encode(self.vision.volume_tokens(volume))

    def image_embedding(self, cls: jax.Array) -> jax.Array:
        return self.image_projection(cls)

    def text_embedding(self, input_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False) -> jax.Array:
        """The report's [CLS] state, projected (B, embed_dim)."""
        return self.text_projection(self.text(input_ids, attention_mask, train=train)[:, 0])

    def head(self, x: jax.Array) -> jax.Array:
        return self.dino_head(x)

    def temperature_scale(self) -> jax.Array:
        """exp(logit_scale), clamped at 100 (CLIP)."""
        return jnp.minimum(jnp.exp(self.logit_scale), 100.0)

    def __call__(self, images, volume, slabs, input_ids, attention_mask, *, train: bool = False):
        """Every part once (for init)."""
        cls_2d = self.encode_images(images, train=train)[:, 0]
        cls_3d = self.encode_volumes(volume, slabs, train=train)[:, 0]
        text = self.text_embedding(input_ids, attention_mask, train=train)
        return (self.image_embedding(cls_2d), self.image_embedding(cls_3d), text, self.head(cls_2d),
                self.temperature_scale())


def cls_attention_from_intermediates(intermediates: Any, num_prefix: int = 1) -> jax.Array:
    """The [CLS] rows every layer sowed (layers, B, heads, tokens) -> softmax over the patch tokens (those after
    the `num_prefix` [CLS]/prefix tokens): (layers, B, heads, patches), the paper's softmax(q K(patches)^T / sqrt C)."""
    logits = layer_intermediates(intermediates, "query_logits")
    return jax.nn.softmax(logits[..., num_prefix:], axis=-1)


def select_volume_slices(model: UniMedI, params: Any, volume: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Attentive slice selection with `params` (no gradient): (slab indices (B, k) int32, scores (B, slabs))."""
    _, state = model.apply({"params": params}, volume, method=UniMedI.volume_cls_logits, mutable=["intermediates"])
    attention = cls_attention_from_intermediates(state["intermediates"])
    scores = jax.lax.stop_gradient(attentive_slice_scores(attention, model.vision.num_slabs))
    return select_slices(scores, k), scores


def random_token_masks(rng: jax.Array, batch: int, tokens: int, ratio: float) -> jax.Array:
    """(batch, tokens) bool with exactly round(ratio * tokens) True per row at uniformly random positions (the
    student's heavily masked view; a fixed count keeps the masked-token buffer static under jit)."""
    count = int(round(ratio * tokens))
    if not 0 <= count <= tokens:
        raise ValueError(f"medjax/models/unimedi.py random_token_masks: ratio={ratio} must be in [0, 1]")
    noise = jax.random.uniform(rng, (batch, tokens))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return ranks < count
