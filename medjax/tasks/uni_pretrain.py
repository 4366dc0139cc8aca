"""UNI pretraining (task `uni_pretrain`): DINOv2 on whole-slide-image tiles. UNI (Chen et al., Nat. Med. 2024)
= DINOv2 (Oquab et al., TMLR 2024) "ViT-L/16 short" on Mass-100K; the networks are medjax.models.dinov2
(DINOv2 is the method), the evaluation medjax.tasks.uni_eval.

Params: {"student": net, "teacher": net, "teacher_temp": (), ["center": (1, K), "ibot_center": (1, K)]}.
Only the student is trained (`optim.frozen` in the config: every param outside `student/` is
`set_to_zero` by medjax.optim, so it has no Adam moments); after each update `post_update` moves the teacher by EMA with momentum cosine 0.992 -> 1,
the centers by EMA (momentum 0.9) of this batch's teacher outputs, and sets the teacher temperature
of the next step (linear warmup 0.04 -> 0.07 over 30 epochs, then constant) -- kept in params because
`loss_fn` has no step. Schedules are DINOv2's `CosineScheduler` (`dinov2/train/train.py`), indexed by
the step, an "epoch" being `schedule.epoch_length` (1250) iterations.

Loss (`dinov2/train/ssl_meta_arch.py` `forward_backward`): DINO over the 18 crop pairs + iBOT on
masked patches + 0.1 * KoLeo per global crop; teacher targets by centering (recipe) or Sinkhorn-Knopp.

Optimizer (`dinov2/train/train.py`, `dinov2/utils/param_groups.py`), built by medjax.optim from the
experiment's `optim` block (experiments/uni_vitl16.py): AdamW (0.9, 0.999) with peak lr
`optim.lr * sqrt(batch / 1024)`, linear warmup over 10 epochs then cosine to 1e-6; weight decay cosine
0.04 -> 0.4, 0 for biases, norms and LayerScale; layer-wise lr decay 0.9 (embeddings 0.9^(depth+1),
patch_embed also x 0.2); the heads' last layer at lr 0 for the first epoch; gradients clipped to norm
3 per student submodule (backbone, head), as DINOv2 clips each FSDP module.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.data import demo as demo_lib
from medjax.data.transforms.block_masking import MaskingGenerator, max_masked_patches, sample_masks
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.data.tiling.coords import tile_slides
from medjax.data.tiling.tissue import PRESETS
from medjax.data.verify import slide_checks
from medjax.data.readers.wsi import list_slides
from medjax.data.pipelines.wsi_tiles import DinoMultiCrop, WSITileSource
from medjax.losses import dino as dino_losses
from medjax.models import dinov2 as dinov2_lib
from medjax.params import merge_params
from medjax.tasks.base import TaskBase
from medjax.errors import MedjaxInputError


# ---- schedules -----------------------------------------------------------------------------------------

def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0,
                    freeze_steps: int = 0) -> optax.Schedule:
    """DINOv2 `CosineScheduler`: 0 for `freeze_steps`, then linspace(warmup_start, base, warmup_steps), then
    final + (base - final) / 2 * (1 + cos(pi * i / n)) over the remaining n steps; `final` from `total_steps` on."""
    n = total_steps - warmup_steps - freeze_steps
    if n < 0:
        raise MedjaxInputError(f"cosine_schedule: total_steps={total_steps} < warmup {warmup_steps} + freeze {freeze_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        i = step - freeze_steps
        warm = warmup_start + (base - warmup_start) * i / max(warmup_steps - 1, 1)
        j = i - warmup_steps
        cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * j / max(n, 1)))
        value = jnp.where(i < warmup_steps, warm, cosine)
        value = jnp.where(step < freeze_steps, 0.0, value)
        return jnp.where(step >= total_steps, final, value)

    return schedule


# ---- data ----------------------------------------------------------------------------------------------

class DinoTransform:
    """Picklable (example, rng) -> {"global_crops" (2, G, G, 3), "local_crops" (L, l, l, 3)}: DINOv2 multi-crop."""

    def __init__(self, multicrop: DinoMultiCrop):
        self.multicrop = multicrop

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        crops = self.multicrop(example, rng)
        return {"global_crops": crops["global_crops"], "local_crops": crops["local_crops"]}


class BatchMasks:
    """Picklable (batch, rng) -> the batch with "masks" (B, 2, N) bool: iBOT block masks drawn over the batch's 2B
    global crops as DINOv2's `collate_data_and_cast` (`dinov2/data/collate.py`) does: int(2B * probability) crops
    masked with ratios stratified in equal bins over `ratio_range`, the rest unmasked, the masks shuffled across
    crops (a sample may have 0, 1 or 2 masked crops). DINOv2 draws them per GPU batch; here per process batch."""

    def __init__(self, generator: MaskingGenerator, ratio_range, probability: float):
        self.generator = generator
        self.ratio_range, self.probability = tuple(ratio_range), float(probability)

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        b = batch["global_crops"].shape[0]
        masks = sample_masks(rng, self.generator, 2 * b, ratio_range=self.ratio_range, probability=self.probability)
        return dict(batch, masks=masks.reshape(b, 2, -1))


def tile_dirs(config, log=print) -> tuple[str, str]:
    """(slides dir, coords dir): `data.dir` holding `slides/` and `coords/` (`python -m medjax.data tile`),
    or the WSI demo, tiled once into its `coords/`."""
    d = config.data
    if d.dir:
        slides, coords = os.path.join(d.dir, d.slides_subdir), os.path.join(d.dir, d.coords_subdir)
        for path, what in ((slides, "slides"), (coords, "CLAM coordinate files <slide_id>.h5")):
            if not os.path.isdir(path):
                raise MedjaxInputError(f"data.dir={d.dir!r}: no {path} ({what}); tile the slides first: python -m "
                                 f"medjax.data tile --slides {slides} --out {coords}")
        return slides, coords
    root = demo_lib.ensure_demo("wsi", log=log)
    slides, coords = os.path.join(root, "slides"), os.path.join(root, "coords")
    if not os.path.isdir(coords):
        staging = f"{coords}.partial-{os.getpid()}"
        log(f"tiling the demo slides into {coords} (once)")
        tile_slides(list_slides(slides), staging, patch_size=int(d.patch_size), magnification=float(d.magnification),
                    params=PRESETS["demo"])  # the demo's small slides (CLAM's a_t = 100 keeps none)
        try:
            os.rename(staging, coords)
        except OSError:  # another process got there first
            if not os.path.isdir(coords):
                raise
    return slides, coords


# ---- DINOv2's init --------------------------------------------------------------------------------------

_LINEAR = re.compile(r"(^|/)(attn/(query|key|value|out)|mlp/fc[12]|(dino|ibot)_head/mlp_\d+)/(kernel|bias)$")
_TINY_TOKENS = re.compile(r"(^|/)(cls_token|register_tokens)$")
_POS_EMBED = re.compile(r"(^|/)pos_embed$")


def dinov2_init(params: Any, rng: jax.Array) -> Any:
    """DINOv2's `init_weights` on a network's params (`dinov2/models/vision_transformer.py` `init_weights`,
    `init_weights_vit_timm`; `layers/dino_head.py` `_init_weights`): every Linear of the blocks and the heads' MLPs
    trunc_normal_(std=0.02) (torch truncates at +-2 absolute, i.e. +-100 std) with zero biases, pos_embed the
    same, cls_token (and register tokens) normal(1e-6). The patch embedding (torch's Conv2d default), norms,
    LayerScale, mask token and the weight-normalised last layer keep their init. Boxed leaves stay boxed."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(rng, len(flat))
    out = {}
    for key, (path, leaf) in zip(keys, flat.items()):
        name = "/".join(path)
        value = nn.unbox(leaf)
        if _LINEAR.search(name) and name.endswith("bias"):
            new = jnp.zeros_like(value)
        elif _LINEAR.search(name) or _POS_EMBED.search(name):
            new = jnp.clip(0.02 * jax.random.normal(key, value.shape, jnp.float32), -2.0, 2.0).astype(value.dtype)
        elif _TINY_TOKENS.search(name):
            new = (1e-6 * jax.random.normal(key, value.shape, jnp.float32)).astype(value.dtype)
        else:
            out[path] = leaf
            continue
        out[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new
    return traverse_util.unflatten_dict(out)


# ---- the task ------------------------------------------------------------------------------------------

def network_from_config(config) -> dinov2_lib.DINOv2Network:
    m, h = config.model, config.head
    dtype = jnp.dtype(config.dtype)
    return dinov2_lib.DINOv2Network(
        image_size=m.image_size, patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, layerscale_init=m.layerscale_init, drop_path=m.drop_path,
        drop_path_uniform=m.drop_path_uniform, drop_add_residual=m.get("drop_add_residual", False),
        num_register_tokens=m.num_register_tokens,
        interpolate_offset=m.interpolate_offset, interpolate_antialias=m.interpolate_antialias, remat=m.remat,
        scan=m.get("scan"),
        head_out_dim=h.out_dim, head_hidden_dim=h.hidden_dim, head_bottleneck_dim=h.bottleneck_dim,
        head_layers=h.num_layers, head_learn_gain=h.learn_gain,
        head_gain_init=h.get("gain_init", 1.0), head_use_bn=h.get("use_bn", False), ibot_separate_head=config.ibot.separate_head,
        ibot_out_dim=config.ibot.out_dim, dtype=dtype)


class UNIPretrainTask(TaskBase):
    """UNI's DINOv2 pretraining (module doc): student and teacher networks, DINO + iBOT + KoLeo loss, EMA teacher."""

    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        self.model = network_from_config(config)
        c = config.crops
        self.grid = c.global_size // config.model.patch_size
        self.num_patches = self.grid ** 2
        ib = config.ibot
        self.mask_ratio, self.mask_probability = tuple(ib.mask_ratio), float(ib.mask_probability)
        self.centering = config.dino.centering
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise MedjaxInputError(f"dino.centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        total, epoch = self.run.total_steps, int(config.schedule.epoch_length)
        t = config.teacher
        self.momentum_fn = cosine_schedule(t.momentum, t.final_momentum, total)
        warm = int(t.warmup_temp_epochs * epoch)
        self.teacher_temp_fn = cosine_schedule(t.temp, t.temp, warm, warmup_steps=warm, warmup_start=t.warmup_temp)

    def mask_buffer(self, global_batch: int) -> int:
        """Static iBOT buffer for a global batch: per process DINOv2's `upperbound` of the masks `BatchMasks` draws
        for its 2 * (global_batch / processes) crops (sum of int(N * bin top)), times the processes."""
        processes = jax.process_count()
        local = max(global_batch // processes, 1)
        return processes * max_masked_patches(self.num_patches, 2 * local, ratio_range=self.mask_ratio,
                                              probability=self.mask_probability)

    def work_per_example(self) -> tuple[int, str]:
        """Backbone tokens of one sample (for throughput): 2 global crops through the student and the
        teacher, the local crops through the student."""
        c, p = self.config.crops, self.config.model.patch_size
        prefix = 1 + self.config.model.num_register_tokens
        return 4 * (self.num_patches + prefix) + c.num_local * ((c.local_size // p) ** 2 + prefix), "tokens"

    def init_batch(self) -> dict:
        c, b = self.config.crops, self.global_batch
        return {"global_crops": np.zeros((b, 2, c.global_size, c.global_size, 3), np.float32),
                "local_crops": np.zeros((b, c.num_local, c.local_size, c.local_size, 3), np.float32),
                "masks": np.zeros((b, 2, self.num_patches), bool)}

    def init_params(self, rng):
        batch = {k: v[:1].reshape((-1,) + v.shape[2:]) for k, v in self.init_batch().items()}  # one sample's crops
        params_rng, dropout_rng = jax.random.split(rng)
        student = self.model.init({"params": params_rng, "dropout": dropout_rng}, batch["global_crops"],
                                  batch["local_crops"], batch["masks"], train=False)["params"]
        scheme = self.config.model.get("weight_init", "flax")
        if scheme == "dinov2":
            student = dinov2_init(student, jax.random.fold_in(params_rng, 1))
        elif scheme != "flax":
            raise MedjaxInputError(f"model.weight_init must be 'dinov2' or 'flax', got {scheme!r}")
        params = {"student": student, "teacher": jax.tree.map(lambda x: x, student),  # DINOv2: teacher = student
                  "teacher_temp": jnp.asarray(self.teacher_temp_fn(0), jnp.float32)}
        if self.centering == "centering":
            params["center"] = nn.Partitioned(jnp.zeros((1, self.config.head.out_dim)), (None, "vocab"))
            ibot_dim = self.config.ibot.out_dim if self.config.ibot.separate_head else self.config.head.out_dim
            params["ibot_center"] = nn.Partitioned(jnp.zeros((1, ibot_dim)), (None, "vocab"))
        return params

    # -- loss -------------------------------------------------------------------------------------------
    def loss_fn(self, params, batch, rng, train):
        cfg = self.config
        b = batch["global_crops"].shape[0]
        flat = dinov2_lib.flatten_crops
        global_crops, local_crops, masks = flat(batch["global_crops"]), flat(batch["local_crops"]), flat(batch["masks"])
        slots = dinov2_lib.masked_token_index(masks, self.mask_buffer(b))
        temp = jax.lax.stop_gradient(params["teacher_temp"])
        teacher = jax.lax.stop_gradient(dinov2_lib.teacher_forward(
            self.model, jax.lax.stop_gradient(params["teacher"]), global_crops, slots["index"]))
        metrics = {}
        if self.centering == "centering":
            dino_targets = dino_losses.centered_teacher_probs(teacher["cls_logits"], params["center"], temp)
            ibot_targets = dino_losses.centered_teacher_probs(teacher["patch_logits"], params["ibot_center"], temp)
            valid = slots["valid"][:, None].astype(jnp.float32)
            metrics["center_batch_mean"] = jnp.mean(teacher["cls_logits"].astype(jnp.float32), axis=0)
            metrics["ibot_center_batch_mean"] = jnp.sum(teacher["patch_logits"] * valid, axis=0) / jnp.maximum(
                slots["num_masked"], 1)
        else:
            dino_targets = dino_losses.sinkhorn_knopp(teacher["cls_logits"], temp, cfg.dino.sinkhorn_iterations)
            ibot_targets = dino_losses.sinkhorn_knopp(teacher["patch_logits"], temp, cfg.dino.sinkhorn_iterations,
                                                      valid=slots["valid"])
        student = dinov2_lib.student_forward(self.model, params["student"], global_crops, local_crops, masks,
                                             slots["index"], rng, train=train)
        per_crop = dinov2_lib.per_crop
        student_crops = jnp.concatenate([per_crop(student["global_logits"], 2),
                                         per_crop(student["local_logits"], cfg.crops.num_local)])
        dino = dino_losses.dino_loss(student_crops, per_crop(dino_targets, 2), cfg.dino.student_temp)
        features = per_crop(student["global_cls"], 2)
        koleo = sum(dino_losses.grouped_koleo_loss(features[i], int(cfg.dino.koleo_group_size)) for i in range(2))
        ibot = dino_losses.ibot_loss(student["patch_logits"], ibot_targets, slots["weight"], 2 * b, cfg.ibot.student_temp)
        loss = cfg.dino.loss_weight * dino + cfg.dino.koleo_weight * koleo + cfg.ibot.loss_weight * ibot
        target_entropy, batch_entropy = dino_losses.target_entropies(dino_targets)
        metrics.update(dino_loss=dino, koleo_loss=koleo, ibot_loss=ibot, teacher_temp=temp,
                       dino_target_entropy=target_entropy, dino_batch_entropy=batch_entropy,
                       masked_patches=slots["num_masked"].astype(jnp.float32))
        return loss, metrics

    # -- post-update -----------------------------------------------------------------------------------
    def post_update(self, params, metrics, step):
        """EMA teacher, centers and the next step's teacher temperature (module doc)."""
        metrics = dict(metrics)
        momentum = self.momentum_fn(step)
        new = dict(params, teacher=dinov2_lib.ema_update(params["teacher"], params["student"], momentum),
                   teacher_temp=jnp.asarray(self.teacher_temp_fn(step + 1), params["teacher_temp"].dtype))
        center_mean, ibot_mean = metrics.pop("center_batch_mean", None), metrics.pop("ibot_center_batch_mean", None)
        if self.centering == "centering":
            m = self.config.dino.center_momentum
            new["center"] = dino_losses.update_center(params["center"], center_mean[None], m)
            new["ibot_center"] = dino_losses.update_center(params["ibot_center"], ibot_mean[None], m)
        metrics["teacher_momentum"] = momentum
        return new, metrics

    # -- data ---------------------------------------------------------------------------------------------
    @functools.cached_property
    def tile_source(self) -> WSITileSource:
        slides, coords = tile_dirs(self.config, self.log)
        source = WSITileSource.from_coords_dir(slides, coords, tile_size=int(self.config.data.tile_size))
        self.verify_data(slide_checks(source.slide_paths, f"{coords} (tile coordinates)"))  # data.verify
        return source

    def transform(self) -> DinoTransform:
        c = self.config.crops
        photometric = {k: (tuple(c[k]) if k == "jitter" else float(c[k]))
                       for k in ("jitter", "jitter_prob", "grayscale_prob", "solarize_prob") if k in c}
        multicrop = DinoMultiCrop(global_size=c.global_size, local_size=c.local_size, global_scale=tuple(c.global_scale),
                                  local_scale=tuple(c.local_scale), num_local=c.num_local, blur_probs=tuple(c.blur_probs),
                                  **photometric)
        return DinoTransform(multicrop)

    def batch_masks(self) -> BatchMasks:
        generator = MaskingGenerator(self.grid, max_num_patches=0.5 * self.num_patches)  # DINOv2 train.py
        return BatchMasks(generator, self.mask_ratio, self.mask_probability)

    def train_data(self):
        return global_batch_dataset(
            self.tile_source, global_batch=self.global_batch, seed=int(self.config.seed), transform=self.transform(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            prefetch_threads=int(self.config.data.prefetch_threads), on_bad_example=self.on_bad_example,
        ).random_map(self.batch_masks(), seed=int(self.config.seed) + 1)  # iBOT masks per batch (BatchMasks)

    # -- evaluation ---------------------------------------------------------------------------------------
    def feature_fn(self, params):
        """images (b, H, W, 3), ImageNet-normalised -> the teacher backbone's CLS after the norm (b, D)
        (DINOv2 evaluates the teacher)."""
        teacher = jax.device_put(nn.unbox(params["teacher"]))
        model = self.model
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=dinov2_lib.DINOv2Network.features)
                        ["cls_token"].astype(jnp.float32))
        return lambda images: apply(teacher, jnp.asarray(images))

    def evaluate(self, params) -> dict[str, float]:
        """UNI's tile kNN / linear probe and slide ABMIL metrics (medjax.tasks.uni_eval) of the teacher encoder,
        or of converted UNI weights (`python -m medjax.convert uni --torch pytorch_model.bin --out DIR`, whose
        params are {"encoder": ...}) when `--checkpoint DIR` names those."""
        from medjax.tasks.uni_eval import evaluate_uni
        from medjax.tasks.uni_tile_features import uni_feature_fn

        params = params.get("params", params) if isinstance(params, dict) else params
        if isinstance(params, dict) and "encoder" in params and "teacher" not in params:
            return evaluate_uni(uni_feature_fn(params), self.config)
        return evaluate_uni(self.feature_fn(params), self.config)

    def results_table(self, exp: str, columns) -> str:
        from medjax.tasks.uni_eval_table import uni_results_table

        return uni_results_table(exp, columns)

    def load_pretrained(self, params, pretrained):
        """Another UNI pretraining run's params (every leaf of the same path and shape), or converted weights
        ({"encoder": ...[, "dino_head", "ibot_head"]}: `python -m medjax.convert uni` / `dinov2`), put into both
        the student and the teacher: the encoder into the backbones, converted DINOv2 heads into the heads."""
        pretrained = pretrained.get("params", pretrained) if isinstance(pretrained, dict) else pretrained
        if isinstance(pretrained, dict) and "encoder" in pretrained and "student" not in pretrained:
            merged = dict(params)
            for side in ("student", "teacher"):
                net = dict(params[side])
                net["backbone"], _ = merge_params(params[side]["backbone"], pretrained["encoder"])
                for head in ("dino_head", "ibot_head"):
                    if head in pretrained and head in net:
                        net[head], _ = merge_params(params[side][head], pretrained[head])
                merged[side] = net
            return merged
        return merge_params(params, pretrained)[0]

