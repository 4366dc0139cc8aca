"""MRM: Masked Relation Modeling for medical image pre-training with genetics (Yang, Li, Li, Yuan,
ICCV 2023). The authors' repository ships plain MAE, not this method; this module is medjax's
implementation of the paper's equations, with the choices below stated where the paper is silent.

Forward pass (section numbers of the paper):
- Tokens. Image: z_I^0 = patch embedding + learned position embedding + class token, from the
  image encoder's own `embed` (so the pre-trained encoder transfers as is). Genome (our design):
  the SNP dosage vector (B, num_snps) is zero-padded to a multiple of `genome_token_size`, cut into
  T tokens of `genome_token_size` dosages, mapped by a Dense to `genome_width` and given a learned
  position embedding: z_G^0 (B, T, genome_width).
- Unmasked path: z_I = ViT blocks(z_I^0); z_G = SNN(z_G^0) (Klambauer et al. 2017, applied per
  token, `snn_layers` layers of `genome_width`).
- Self-modality relation masking (Sec. 3.2.1): one pre-norm Transformer block per modality whose
  attention relations softmax(QK^T/sqrt(d)) lose their top-tau entries per row (tau_image /
  tau_genome): z_I^S, z_G^S from z_I^0, z_G^0. Where it sits is a choice (the paper does not say):
  * `mask_layers=()` (default): one extra block on the embeddings, as above. Why: the encoder's own layers
    stay plain attention, so the unmasked path z_I is exactly the encoder that transfers, the masked path
    reuses those weights on relation-masked tokens, and the masking costs one attention per modality.
  * `mask_layers=(i, ...)`: the masking happens inside the image encoder's own attention in those layers
    (0-based; same weights, unrolled encoder, `model.scan=false`): z_I^S = the encoder with masked layers on
    z_I^0 (final norm included); the cross block then gives z_I^C, which is z_{I,M} (the encoder has run).
    The genome side keeps its block (the SNN has no attention).
  * `relation_output="literal"`: every extra masking block (self and cross) is the paper's literal
    z^S = R^M V (`RelationMaskedValues`: Q, K, V linear maps, heads concatenated; no norm, output projection,
    residual or MLP); "block" (default) is the pre-norm Transformer block around R^M V.
- Cross-modality relation masking (Sec. 3.2.1): a pre-norm cross-attention block with Q from z_I^S
  and K, V from z_G^S (ratio tau_cross) gives z_I^C; the mirror block (Q from z_G^S, K, V from
  z_I^S) gives z_G^C. Different image and genome widths are bridged by the K/V projections.
- Reconstruction (Sec. 3.2.2): z_{I,M} = the SAME ViT blocks (shared weights) on z_I^C;
  z_{G,M} = the same SNN on z_G^C. z_I^F = concat(z_{I,M}; z_G) and z_G^F = concat(z_{G,M}; z_I)
  over tokens, each side projected to `decoder_width`; h_I is an MAE decoder (its own position
  embeddings over the fused tokens, `decoder_depth` pre-norm blocks) predicting p*p*3 pixels per
  image patch from the image-token positions; h_G is a decoder of the same kind
  (`genome_decoder_depth` blocks) predicting each genome token's `genome_token_size` dosages,
  unpadded back to num_snps.
- Relation matching (Sec. 3.2.3) uses the mean over tokens (class token excluded) of z_I, z_{I,M},
  z_G, z_{G,M} (the loss centres them over the batch before the cosine by default: `relation_similarity`,
  medjax.losses.relation_matching); when genome_width != width one shared Dense maps both pooled genome features to
  `width` so that the image-genome cosine similarities are defined.
- Stochastic depth (`drop_path`) acts in the image encoder only; the relation-masking blocks and
  the decoders use `mlp_ratio` and no drop path. Relation matching keeps gradient on both the
  complete and the masked side (the paper stops neither).
- Objective (Sec. 3.2.4): L = L_recon + lam (L_self + L_cross), see `medjax.losses.mrm.mrm_loss`.

Defaults: ViT-B/16 at 224 (768 wide, 12 blocks, 12 heads) with MAE's decoder, 512 wide x 8 blocks
x 16 heads (as in the authors' repository), an SNN of 2 layers, genome_token_size 64 and
genome_width 768 (the genome tokenisation itself is our design).
OUR choices, the paper gives no numbers: tau_image = tau_genome = tau_cross = 0.5, lam = 1.0,
snn_dropout = 0.1, genome_heads = 12, genome_decoder_depth = 2 (as in experiments/mrm_retina.py).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.dtypes import parse_dtype
from medjax.nn.snn import SNN
from medjax.kernels.relation_mask import relation_mask_attention
from medjax.nn.transformer import HeadsDense
from medjax.nn.vit import TOKENS, EncoderBlock, ViTEncoder, layer_norm

Dtype = Any
# A kernel between two model widths cannot name "embed" twice (one mesh axis per spec).
_PROJECTION_AXES = ("mlp", "embed")


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _position_embedding(module: nn.Module, tokens: int, width: int) -> jax.Array:
    return module.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                        (1, tokens, width), module.param_dtype)


class GenomeTokenizer(nn.Module):
    """SNP dosages (B, num_snps) -> z_G^0 (B, T, width), T = ceil(num_snps / token_size) (our design)."""

    num_snps: int
    token_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, genome: jax.Array) -> jax.Array:
        if genome.ndim != 2 or genome.shape[1] != self.num_snps:
            raise ValueError(f"medjax/models/mrm.py GenomeTokenizer: expected genome (batch, "
                             f"num_snps={self.num_snps}), got {genome.shape}")
        tokens = math.ceil(self.num_snps / self.token_size)
        x = jnp.pad(genome.astype(self.dtype), ((0, 0), (0, tokens * self.token_size - self.num_snps)))
        x = x.reshape(genome.shape[0], tokens, self.token_size)
        x = _dense(self.width, ("snps", "embed"), self.dtype, self.param_dtype, "proj")(x)
        x = x + _position_embedding(self, tokens, self.width).astype(x.dtype)
        return nn.with_logical_constraint(x, TOKENS)


class RelationMaskedValues(nn.Module):
    """MRM Sec. 3.2.1 literally: z = R^M V with Q = z_q W_Q + b, K = z_kv W_K + b, V = z_kv W_V + b (heads of
    width/heads), R^M the row-wise top-tau-masked softmax(Q K^T / sqrt(d)) (`relation_mask_attention`), the heads
    concatenated: (batch, q_tokens, width of z_q). Nothing else: no norm, output projection, residual or MLP."""

    num_heads: int
    ratio: float
    kernel_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None) -> jax.Array:
        x_kv = x_q if x_kv is None else x_kv
        width = x_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"medjax/models/mrm.py RelationMaskedValues: num_heads={self.num_heads} must divide "
                             f"the width {width}")
        heads = (self.num_heads, width // self.num_heads)
        proj = lambda name: HeadsDense(heads, ("embed", "heads", "kv"), 1, True, self.dtype,  # noqa: E731
                                       self.param_dtype, name=name)
        q, k, v = proj("query")(x_q), proj("key")(x_kv), proj("value")(x_kv)
        out = relation_mask_attention(q, k, v, ratio=self.ratio, impl=self.kernel_impl)
        return nn.with_logical_constraint(out.reshape(x_q.shape[:2] + (width,)), TOKENS)


class FusionDecoder(nn.Module):
    """h(.) of MRM Sec. 3.2.2: an MAE-style decoder on concat(primary; context) over tokens that
    predicts `out_features` values for each primary token (kernel axes ("embed", out_axis))."""

    width: int
    depth: int
    num_heads: int
    out_features: int
    out_axis: str
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, primary: jax.Array, context: jax.Array, *, train: bool) -> jax.Array:
        dense = partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.concatenate([dense(self.width, _PROJECTION_AXES, name="embed_primary")(primary),
                             dense(self.width, _PROJECTION_AXES, name="embed_context")(context)], axis=1)
        x = x + _position_embedding(self, x.shape[1], self.width).astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"block_{i}")(x, train=train)
        x = layer_norm(self.dtype, self.param_dtype, "norm")(x)
        return dense(self.out_features, ("embed", self.out_axis), name="pred")(x[:, :primary.shape[1]])


class MRM(nn.Module):
    """Masked Relation Modeling (ICCV 2023): see the module docstring for the design."""

    num_snps: int
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    genome_token_size: int = 64
    genome_width: int = 768
    genome_heads: int = 12
    snn_layers: int = 2
    snn_dropout: float = 0.1
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    genome_decoder_depth: int = 2
    tau_image: float = 0.5
    tau_genome: float = 0.5
    tau_cross: float = 0.5
    drop_path: float = 0.0
    # "sincos": the image encoder's position table is MAE's fixed 2D sin-cos (the authors' code; the task
    # freezes it), "learned": N(0, 0.02) and trained
    pos_embed: str = "learned"
    remat: bool | str = "none"  # the image encoder's blocks: "none" | "full" | "dots_saveable" (True = "full")
    scan: bool | str | None = None  # nn.scan the image encoder's blocks (None: depth >= 12; ViTEncoder.scan)
    # where self-modality relation masking sits (module docstring): () = one extra block on the embeddings;
    # (i, ...) = inside the image encoder's own attention layers i (0-based)
    mask_layers: tuple[int, ...] = ()
    relation_output: str = "block"  # "block": a Transformer block around R^M V; "literal": z^S = R^M V
    kernel_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_fields(self) -> None:
        if self.relation_output not in ("block", "literal"):
            raise ValueError(f"medjax/models/mrm.py MRM.relation_output={self.relation_output!r}; expected 'block' or "
                             "'literal'")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"medjax/models/mrm.py MRM.pos_embed={self.pos_embed!r}; expected 'sincos' or 'learned'")
        for name in ("tau_image", "tau_genome", "tau_cross", "snn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"medjax/models/mrm.py MRM.{name} must be in [0, 1), got {getattr(self, name)}")
        for name, heads, width in (("genome_heads", self.genome_heads, self.genome_width),
                                   ("decoder_heads", self.decoder_heads, self.decoder_width)):
            if width % heads:
                raise ValueError(f"medjax/models/mrm.py MRM.{name}={heads} must divide its width {width}")
        if self.num_snps < 1 or self.genome_token_size < 1 or self.snn_layers < 1:
            raise ValueError("medjax/models/mrm.py MRM: num_snps, genome_token_size and snn_layers must be >= 1, got "
                             f"{self.num_snps}, {self.genome_token_size}, {self.snn_layers}")

    @nn.compact
    def __call__(self, image: jax.Array, genome: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        self._check_fields()
        if genome.shape[0] != image.shape[0]:
            raise ValueError(f"medjax/models/mrm.py MRM: image batch {image.shape[0]} != genome batch "
                             f"{genome.shape[0]}")
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        image_encoder = ViTEncoder(self.image_size, self.patch_size, self.width, self.depth, self.num_heads,
                                   self.mlp_ratio, class_token=True, drop_path=self.drop_path, remat=self.remat,
                                   scan=self.scan, pos_embed_init="sincos" if self.pos_embed == "sincos" else "normal",
                                   **kinds, name="image_encoder")
        snn = SNN((self.genome_width,) * self.snn_layers, self.snn_dropout, **kinds, name="genome_snn")
        block = partial(EncoderBlock, mlp_ratio=self.mlp_ratio, kernel_impl=self.kernel_impl, **kinds)

        z_i0 = image_encoder.embed(image)  # (B, 1 + N, width)
        z_g0 = GenomeTokenizer(self.num_snps, self.genome_token_size, self.genome_width, **kinds,
                               name="genome_tokenizer")(genome)  # (B, T, genome_width)
        z_i = image_encoder.encode(z_i0, train=train)
        z_g = snn(z_g0, train=train)
        def relation_mask(heads, ratio, name, x, x_kv=None):  # one extra masking block (module docstring)
            if self.relation_output == "literal":
                return RelationMaskedValues(heads, ratio, self.kernel_impl, **kinds, name=name)(x, x_kv)
            return block(heads, relation_mask_ratio=ratio, name=name)(x, x_kv, train=train)

        # Sec. 3.2.1: self-modality, then cross-modality relation masking.
        if self.mask_layers:  # inside the image encoder's own attention layers
            z_i_s = image_encoder.encode_relation_masked(z_i0, self.tau_image, self.mask_layers, train=train)
        else:
            z_i_s = relation_mask(self.num_heads, self.tau_image, "image_self_mask", z_i0)
        z_g_s = relation_mask(self.genome_heads, self.tau_genome, "genome_self_mask", z_g0)
        z_i_c = relation_mask(self.num_heads, self.tau_cross, "image_cross_mask", z_i_s, z_g_s)
        z_g_c = relation_mask(self.genome_heads, self.tau_cross, "genome_cross_mask", z_g_s, z_i_s)
        # Sec. 3.2.2: the same encoders on the relation-masked tokens, then fused decoding.
        z_i_m = z_i_c if self.mask_layers else image_encoder.encode(z_i_c, train=train)
        z_g_m = snn(z_g_c, train=train)
        decoder = partial(FusionDecoder, self.decoder_width, num_heads=self.decoder_heads, mlp_ratio=self.mlp_ratio,
                          **kinds)
        image_pred = decoder(depth=self.decoder_depth, out_features=self.patch_size ** 2 * image.shape[-1],
                             out_axis="patch", name="image_decoder")(z_i_m, z_g, train=train)[:, 1:]
        genome_pred = decoder(depth=self.genome_decoder_depth, out_features=self.genome_token_size, out_axis="snps",
                              name="genome_decoder")(z_g_m, z_i, train=train)
        genome_pred = genome_pred.reshape(genome.shape[0], -1)[:, :self.num_snps]

        pool = lambda z: jnp.mean(z.astype(jnp.float32), axis=1)  # noqa: E731
        genome_pooled, genome_masked_pooled = pool(z_g), pool(z_g_m)
        if self.genome_width != self.width:
            to_image = _dense(self.width, _PROJECTION_AXES, jnp.float32, self.param_dtype, "genome_pool_proj")
            genome_pooled, genome_masked_pooled = to_image(genome_pooled), to_image(genome_masked_pooled)
        return {
            "image_pred": image_pred.astype(jnp.float32),
            "genome_pred": genome_pred.astype(jnp.float32),
            "image_pooled": pool(z_i[:, 1:]),
            "image_masked_pooled": pool(z_i_m[:, 1:]),
            "genome_pooled": genome_pooled,
            "genome_masked_pooled": genome_masked_pooled,
        }


_LOSS_ONLY_KEYS = {"lam", "norm_pix_loss", "relation_similarity"}


def mrm_from_config(model_cfg: Any, *, num_snps: int) -> MRM:
    """An MRM from the experiment config's `model` block (ConfigDict or mapping).

    Keys are MRM's field names (num_snps comes from the data); absent keys take MRM's defaults;
    `lam`, `norm_pix_loss` and `relation_similarity` belong to the loss and are skipped; any other key is an
    error.
    """
    cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    fields = set(MRM.__dataclass_fields__) - {"parent", "name", "num_snps"}
    unknown = set(cfg) - fields - _LOSS_ONLY_KEYS - {"num_snps"}
    if unknown:
        raise ValueError(f"medjax/models/mrm.py mrm_from_config: unknown model key(s) {sorted(unknown)}; "
                         f"expected some of {sorted(fields | _LOSS_ONLY_KEYS)}")
    if "num_snps" in cfg and cfg["num_snps"] != num_snps:
        raise ValueError(f"medjax/models/mrm.py mrm_from_config: model.num_snps={cfg['num_snps']} but the genome "
                         f"data has {num_snps} SNPs")
    kwargs = {key: value for key, value in cfg.items() if key in fields}
    if "mask_layers" in kwargs:
        kwargs["mask_layers"] = tuple(int(i) for i in (kwargs["mask_layers"] or ()))
    for key in ("dtype", "param_dtype"):
        if key in kwargs:
            kwargs[key] = parse_dtype(kwargs[key], f"medjax/models/mrm.py mrm_from_config model.{key}")
    return MRM(num_snps=num_snps, **kwargs)
