"""The optimizers as they were hand-written per family before `medjax.optim` built them from config
(commit 61bedb9), kept verbatim in substance so tests/optim/test_optim_families.py can check that the
config-built optimizers give the same updates."""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# ---- medjax/optim.py (MRM, APTOS, Universal without decay_all_params) ----
def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
    warmup = int(optim_cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim_cfg.lr), warmup_steps=warmup,
        decay_steps=warmup + decay_steps, end_value=float(optim_cfg.lr) * float(optim_cfg.min_lr_ratio),
    )


def _decay_mask(params):
    """Weight decay on matrices/kernels only (ndim >= 2): no decay on biases, norms, 1-d embeddings."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if float(optim_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask,
    ))
    return optax.chain(*parts), schedule


# ---- Universal, decay_all_params ----
def universal_optimizer(o, total_steps):
    schedule = learning_rate_schedule(o, total_steps)
    parts = [optax.clip_by_global_norm(float(o.clip_norm))] if float(o.clip_norm) > 0 else []
    parts.append(optax.adamw(learning_rate=schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay)))
    return optax.chain(*parts), schedule


# ---- DINOv2 (medjax/tasks/uni_pretrain.py, medjax/models/dinov2.py) ----
def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0,
                    freeze_steps: int = 0) -> optax.Schedule:
    """DINOv2 `CosineScheduler`: 0 for `freeze_steps`, then linspace(warmup_start, base, warmup_steps), then
    final + (base - final) / 2 * (1 + cos(pi * i / n)) over the remaining n steps; `final` from `total_steps` on."""
    n = total_steps - warmup_steps - freeze_steps
    if n < 0:
        raise ValueError(f"cosine_schedule: total_steps={total_steps} < warmup {warmup_steps} + freeze {freeze_steps}")

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


def _group_key(path, depth: int = 2) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path[:depth])


def clip_by_submodule_norm(max_norm: float, depth: int = 2) -> optax.GradientTransformation:
    """torch `clip_grad_norm_(max_norm)` per submodule -- the leaves sharing their first `depth` path keys
    (DINOv2 clips the student's backbone and head separately): g *= min(1, max_norm / (||g|| + 1e-6))."""

    def update(updates, state, params=None):
        del params
        sums: dict[tuple, jax.Array] = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
            key = _group_key(path, depth)
            sums[key] = sums.get(key, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        scale = {k: jnp.minimum(1.0, max_norm / (jnp.sqrt(v) + 1e-6)) for k, v in sums.items()}
        updates = jax.tree_util.tree_map_with_path(lambda p, u: (u * scale[_group_key(p, depth)]).astype(u.dtype),
                                                   updates)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ParamGroupsState(NamedTuple):
    count: jax.Array


def scale_by_param_groups(lr_fn, last_layer_lr_fn, wd_fn, lr_multiplier, wd_multiplier,
                          is_last_layer) -> optax.GradientTransformation:
    """torch AdamW's step with DINOv2's per-group lr and weight decay, on the Adam direction u:
    update = -lr_g (u + wd_g p), lr_g = (last_layer_lr if last layer else lr)(t) * lr_multiplier(path),
    wd_g = wd(t) * wd_multiplier(path)."""

    def init(params):
        del params
        return ParamGroupsState(jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        t = state.count
        lr, last_lr, wd = lr_fn(t), last_layer_lr_fn(t), wd_fn(t)

        def one(path, u, p):
            rate = (last_lr if is_last_layer(path) else lr) * lr_multiplier(path)
            decay = wd * wd_multiplier(path)
            return (-rate * (u + decay * p)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), ParamGroupsState(t + 1)

    return optax.GradientTransformation(init, update)


_EMBEDDING = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")


def _names(path: Sequence[Any]) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def lr_multiplier(path: Sequence[Any], depth: int, layer_decay: float = 0.9, patch_embed_mult: float = 0.2) -> float:
    """Layer-wise lr decay: decay ** (depth + 1 - layer) with layer 0 for the embeddings (patch_embed,
    pos_embed, cls/mask/register tokens), i + 1 for block i, depth + 1 for the final norm; the heads
    get 1; patch_embed also times `patch_embed_mult` (DINOv2 `get_vit_lr_decay_rate`)."""
    names = _names(path)
    if "backbone" not in names:
        return 1.0
    layer = depth + 1
    if any(name in _EMBEDDING for name in names):
        layer = 0
    else:
        for name in names:
            match = re.fullmatch(r"blocks_(\d+)", name)
            if match:
                layer = int(match.group(1)) + 1
    mult = layer_decay ** (depth + 1 - layer)
    return mult * patch_embed_mult if "patch_embed" in names else mult


def weight_decay_multiplier(path: Sequence[Any]) -> float:
    """0 for biases, norms and LayerScale gammas (DINOv2: name ends with "bias" or contains "norm" or
    "gamma"; here LayerScale is "ls1"/"ls2"), else 1 (embeddings and tokens are decayed, as DINOv2)."""
    names = _names(path)
    if names[-1] == "bias" or any("norm" in name for name in names) or names[-1] in ("ls1", "ls2"):
        return 0.0
    return 1.0


def is_last_layer(path: Sequence[Any]) -> bool:
    """The heads' weight-normalised last layer (frozen for the first epoch)."""
    return "last_layer" in _names(path)


def dinov2_optimizer(o, epoch, depth, global_batch, total_steps):
    lr = o.lr * math.sqrt(global_batch / 1024.0)
    warmup = int(o.warmup_epochs * epoch)
    lr_fn = cosine_schedule(lr, o.min_lr, total_steps, warmup_steps=warmup)
    frozen = int(o.freeze_last_layer_epochs * epoch)
    last_layer_lr_fn = lambda t: jnp.where(jnp.asarray(t) < frozen, 0.0, lr_fn(t))  # noqa: E731
    wd_fn = cosine_schedule(o.weight_decay, o.weight_decay_end, total_steps)
    student = optax.chain(
        clip_by_submodule_norm(o.clip_grad) if o.clip_grad > 0 else optax.identity(),
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        scale_by_param_groups(lr_fn, last_layer_lr_fn, wd_fn,
                              lambda p: lr_multiplier(p, depth, o.layer_decay, o.patch_embed_lr_mult),
                              weight_decay_multiplier, is_last_layer))
    labels = lambda params: {k: jax.tree.map(lambda _: "student" if k == "student" else "frozen", v)  # noqa: E731
                             for k, v in params.items()}
    return optax.multi_transform({"student": student, "frozen": optax.set_to_zero()}, labels), lr_fn


# ---- PTUnifier pretraining (medjax/tasks/ptunifier.py) ----
HEAD_PARAMS = ("mlm_transform", "mlm_norm", "mlm_decoder", "mlm_bias", "itm_head", "itc_image_norm", "itc_text_norm",
               "itc_image_proj", "itc_text_proj")
MULTI_MODAL_PARAMS = ("text_proj", "image_proj", "text_pooler", "image_pooler", "visual_prompts", "textual_prompts")
POOL_PARAMS = ("visual_prompts", "textual_prompts")
def param_group(path: tuple[str, ...]) -> str:
    """"head", "multi_modal" or "base" for a param path (its top-level module)."""
    top = path[0]
    if top in HEAD_PARAMS:
        return "head"
    return "multi_modal" if top in MULTI_MODAL_PARAMS or top.startswith("fusion_") else "base"


def _ptunifier_decay_mask(params):
    """Weight decay except on biases and LayerNorm scales (original: no_decay = bias, LayerNorm.*)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: not (path[-1] in ("bias", "mlm_bias") or path[-1] == "scale")
                                         for path in flat})


def ptunifier_optimizer(o, released, total_steps):
    warmup = int(round(float(o.warmup_ratio) * total_steps)) if o.warmup_ratio else int(o.warmup_steps)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, float(o.lr), max(warmup, 1)),
                                     optax.linear_schedule(float(o.lr), 0.0, max(total_steps - warmup, 1))],
                                    [max(warmup, 1)])

    def adamw(multiplier):
        return optax.adamw(lambda step: schedule(step) * multiplier, b1=float(o.b1), b2=float(o.b2),
                           eps=float(o.eps), weight_decay=float(o.weight_decay), mask=_ptunifier_decay_mask)

    transforms = {"base": adamw(1.0), "head": adamw(float(o.lr_multiplier_head)),
                  "multi_modal": adamw(float(o.lr_multiplier_multi_modal)), "frozen": optax.set_to_zero()}

    def labels(params):
        def label(path, _):
            keys = tuple(str(getattr(p, "key", p)) for p in path)
            if released and keys[0] in POOL_PARAMS:
                return "frozen"
            return param_group(keys)
        return jax.tree_util.tree_map_with_path(label, params)

    parts = [optax.clip_by_global_norm(float(o.clip_norm))] if float(o.clip_norm) > 0 else []
    return optax.chain(*parts, optax.multi_transform(transforms, labels)), schedule


# ---- PTUnifier fine-tuning (medjax/tasks/ptunifier_finetune.py) ----
HEADS = ("mlm_", "itm_", "itc_", "task_head")  # the original's head_names
MULTI_MODAL = ("text_proj", "image_proj", "fusion_", "text_pooler", "image_pooler", "visual_prompts", "textual_prompts")


def finetune_param_group(top_level_name: str) -> str:
    """"head", "multi_modal" (the original's multi_modal_* modules and pseudo-token pools) or "backbone"."""
    if top_level_name.startswith(HEADS):
        return "head"
    return "multi_modal" if top_level_name.startswith(MULTI_MODAL) else "backbone"


def finetune_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW per group (lr x 1 / x multi_modal_multiplier / x head_multiplier), no decay on biases and
    LayerNorm scales, linear warmup over warmup_fraction of the steps then linear decay to 0 (the
    original's set_schedule)."""
    warmup = max(1, int(round(float(optim.warmup_fraction) * total_steps)))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup),
                                     optax.linear_schedule(1.0, 0.0, max(total_steps - warmup, 1))], [warmup])
    scale = {"backbone": 1.0, "multi_modal": float(optim.multi_modal_multiplier), "head": float(optim.head_multiplier)}

    def adamw(group):
        return optax.adamw(lambda step: float(optim.lr) * scale[group] * schedule(step), b1=float(optim.b1),
                           b2=float(optim.b2), eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                           mask=_finetune_decay_mask)

    labels = lambda params: {k: jax.tree.map(lambda _: finetune_param_group(k), v) for k, v in params.items()}  # noqa: E731
    parts = [optax.clip_by_global_norm(float(optim.clip_norm))] if float(optim.clip_norm) > 0 else []
    parts.append(optax.multi_transform({g: adamw(g) for g in scale}, labels))
    return optax.chain(*parts), lambda step: float(optim.lr) * schedule(step)


def _finetune_decay_mask(params):
    """Weight decay except on biases and LayerNorm scales (the original's no_decay names)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in ("bias", "mlm_bias", "scale") for path in flat})


