"""Every family's optimizer from its `optim` config block (big_vision `optax.make` style).

One key schema for every experiment:

    optim.name            "adamw" (torch AdamW / optax.adamw: decoupled decay, -lr * (adam + wd * p)),
                          "sgd" (momentum `b1`, decay added to the gradient direction) or "lion"
    optim.lr              peak learning rate; `lr_scaling` "linear" | "sqrt" multiplies it by
                          (global batch / lr_reference_batch) or its square root (DINOv2 `sqrt_wrt_1024`)
    optim.schedule        "cosine" | "linear" | "constant" after a linear warmup of `warmup_steps` steps
                          (or `warmup_fraction` of train.steps, rounded; at most one of the two is set),
                          decaying to `min_lr` (absolute, when > 0) else `lr * min_lr_ratio`;
                          `warmup_linspace` = DINOv2's np.linspace warmup, which reaches lr at warmup - 1
    optim.weight_decay    with `weight_decay_end` > 0 a cosine from weight_decay to weight_decay_end (DINOv2)
    optim.lr_mults        [(regex, multiplier), ...] on "/"-joined param paths; the first match wins,
                          unmatched params get 1
    optim.wd_mults        [(regex, multiplier), ...]; the first match wins, unmatched params get 0.
                          Empty: decay on params with ndim >= 2 only (MAE / timm: no decay on biases and
                          norms; embeddings and kernels decayed)
    optim.frozen          [regex, ...]: no update, no weight decay, no optimizer state (optax.set_to_zero)
    optim.frozen_early    [regex, ...]: lr 0 for those params while step < `frozen_early_steps` (DINOv2's last layer)
    optim.layer_decay     layer-wise lr decay (BEiT / DINOv2 `get_vit_lr_decay_rate`): inside the params
                          matching `layer_decay_scope`, lr x rate ** (depth + 1 - layer) with layer 0 for
                          the embeddings (`layer_decay_embed` regex), i + 1 for block i (`blocks_i/`, or
                          axis 0 of a scanned `blocks/` stack), depth + 1 for the rest; depth is counted
                          from the params. 1.0 = off
    optim.clip_norm       > 0: clip by global norm (torch `clip_grad_norm_`); `clip_depth` > 0 clips each
                          subtree of the first `clip_depth` path keys separately (DINOv2: backbone, heads)
    optim.b1, b2, eps     Adam (or Lion / SGD momentum) hyper-parameters

`make_optimizer(optim_cfg, total_steps, global_batch)` returns (transformation, lr schedule).
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.global_norm import global_norm
from medjax.params import path_string

OPTIMIZERS = ("adamw", "sgd", "lion")
SCHEDULES = ("cosine", "linear", "constant")
# Layer 0 of layer-wise lr decay: the ViT embeddings and tokens (BEiT / DINOv2 `get_vit_lr_decay_rate`).
LAYER_DECAY_EMBED = r"(^|/)(patch_embed|pos_embed|cls_token|mask_token|register_tokens)(/|$)"


def warmup_steps(optim_cfg, total_steps: int) -> int:
    fraction = float(optim_cfg.get("warmup_fraction", 0.0))
    steps = int(optim_cfg.get("warmup_steps", 0))
    if fraction and steps:
        raise ValueError(f"optim: set warmup_steps={steps} or warmup_fraction={fraction}, not both")
    return int(round(fraction * total_steps)) if fraction else steps


def peak_lr(optim_cfg, global_batch: int | None) -> float:
    lr, rule = float(optim_cfg.lr), str(optim_cfg.get("lr_scaling", "none"))
    if rule == "none":
        return lr
    ratio = global_batch / float(optim_cfg.get("lr_reference_batch", 256))
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"optim.lr_scaling={rule!r}; expected none, linear or sqrt")


def warmup_then_decay(peak: float, end: float, total_steps: int, warmup: int, kind: str = "cosine",
                      linspace: bool = False, start: float = 0.0) -> optax.Schedule:
    """Linear warmup start -> peak over `warmup` steps, then `kind` decay to `end` over the remaining
    max(total - warmup, 1) steps, `end` from then on. Cosine: end + (peak - end) / 2 (1 + cos(pi j / n))."""
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r}; expected one of {SCHEDULES}")
    if total_steps < warmup:
        raise ValueError(f"optim: warmup of {warmup} steps is longer than train.steps={total_steps}")
    n = max(total_steps - warmup, 1)
    denominator = max(warmup - 1, 1) if linspace else max(warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = start + (peak - start) * step / denominator
        j = jnp.minimum(step - warmup, n)
        if kind == "cosine":
            decayed = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * j / n))
        elif kind == "linear":
            decayed = end + (peak - end) * (1.0 - j / n)
        else:
            decayed = jnp.full_like(step, peak)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def learning_rate_schedule(optim_cfg, total_steps: int, global_batch: int | None = None) -> optax.Schedule:
    peak = peak_lr(optim_cfg, global_batch)
    min_lr = float(optim_cfg.get("min_lr", 0.0))
    end = min_lr if min_lr > 0 else peak * float(optim_cfg.get("min_lr_ratio", 0.0))
    return warmup_then_decay(peak, end, int(total_steps), warmup_steps(optim_cfg, total_steps),
                             str(optim_cfg.get("schedule", "cosine")), bool(optim_cfg.get("warmup_linspace", False)))


def weight_decay_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    wd, wd_end = float(optim_cfg.weight_decay), float(optim_cfg.get("weight_decay_end", 0.0))
    if wd_end > 0:
        return warmup_then_decay(wd, wd_end, int(total_steps), 0, "cosine")
    return lambda step: jnp.asarray(wd, jnp.float32)


# ---- per-parameter rules ------------------------------------------------------------------------------

def _rules(pairs: Sequence, key: str) -> list[tuple[re.Pattern, Any]]:
    rules = []
    for pair in pairs or ():
        if len(pair) != 2:
            raise ValueError(f"optim.{key}: expected (regex, value) pairs, got {pair!r}")
        rules.append((re.compile(str(pair[0])), pair[1]))
    return rules


def first_match(rules, name: str, default):
    for pattern, value in rules:
        if pattern.search(name):
            return value
    return default


def layer_decay_multipliers(optim_cfg, params) -> dict[str, Any]:
    """path -> lr multiplier (a float, or an array over axis 0 of a scanned block stack)."""
    rate = float(optim_cfg.get("layer_decay", 1.0))
    if rate == 1.0:
        return {}
    scope = re.compile(str(optim_cfg.get("layer_decay_scope", "")))
    embed = re.compile(str(optim_cfg.get(
        "layer_decay_embed", LAYER_DECAY_EMBED)))
    block = re.compile(r"(^|/)blocks_(\d+)/")
    stacked = re.compile(r"(^|/)blocks/")
    leaves = [(path_string(p), np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    inside = [(n, s) for n, s in leaves if scope.search(n)]
    depth = 0
    for name, shape in inside:
        if (m := block.search(name)):
            depth = max(depth, int(m.group(2)) + 1)
        elif stacked.search(name):
            depth = max(depth, shape[0])
    out = {}
    for name, shape in inside:
        if embed.search(name):
            out[name] = rate ** (depth + 1)
        elif (m := block.search(name)):
            out[name] = rate ** (depth - int(m.group(2)))
        elif stacked.search(name):
            per_layer = np.asarray([rate ** (depth - i) for i in range(shape[0])], np.float32)
            out[name] = per_layer.reshape((shape[0],) + (1,) * (len(shape) - 1))
        else:
            out[name] = 1.0
    return out


def lr_multipliers(optim_cfg, params) -> dict[str, Any]:
    """path -> layer decay x the first matching `lr_mults` value (layer decay first, as DINOv2 multiplies)."""
    rules = _rules(optim_cfg.get("lr_mults", ()), "lr_mults")
    layers = layer_decay_multipliers(optim_cfg, params)
    out = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name = path_string(path)
        out[name] = layers.get(name, 1.0) * float(first_match(rules, name, 1.0))
    return out


def wd_multipliers(optim_cfg, params) -> dict[str, float]:
    rules = _rules(optim_cfg.get("wd_mults", ()), "wd_mults")
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_string(path)
        out[name] = float(first_match(rules, name, 0.0)) if rules else float(np.ndim(leaf) >= 2)
    return out


def frozen_matcher(optim_cfg):
    """path string ("a/b/kernel") -> whether one of the `optim.frozen` regexes matches it (`re.search`)."""
    patterns = [re.compile(str(r)) for r in optim_cfg.get("frozen", ()) or ()]
    return lambda path: any(r.search(path) for r in patterns)


def frozen_labels(optim_cfg, params):
    """"frozen" / "trained" per leaf from `optim.frozen` regexes."""
    frozen = frozen_matcher(optim_cfg)
    return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if frozen(path_string(p)) else "trained", params)


# ---- transformations ----------------------------------------------------------------------------------

def clip_by_norm(max_norm: float, depth: int = 0) -> optax.GradientTransformation:
    """torch `clip_grad_norm_(max_norm)`: g *= min(1, max_norm / (||g|| + 1e-6)) over all leaves (depth 0)
    or separately per subtree sharing the first `depth` path keys (DINOv2 clips backbone and heads apart)."""
    if depth <= 0:
        return clip_by_global_norm(max_norm)

    def group(path):
        return tuple(str(getattr(p, "key", p)) for p in path[:depth])

    def update(updates, state, params=None):
        del params
        groups: dict[tuple, list] = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
            groups.setdefault(group(path), []).append(leaf)
        scale = {k: jnp.minimum(1.0, max_norm / (global_norm(v) + 1e-6)) for k, v in groups.items()}
        return jax.tree_util.tree_map_with_path(lambda p, u: (u * scale[group(p)]).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (u unchanged when ||u|| < max_norm, else u * max_norm / ||u||) with the norm
    from `medjax.global_norm`: a few reductions instead of two ops per leaf, and the same expression as the
    trainer's logged grad_norm, so XLA computes it once."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


class StepCount(NamedTuple):
    count: jax.Array


def scale_by_lr_and_decay(optim_cfg, lr_fn, wd_fn, decoupled: bool = True) -> optax.GradientTransformation:
    """update = -lr(t) m_lr (u + wd(t) m_wd p) (decoupled: AdamW / DINOv2's param groups) with per-path
    multipliers; params matching `frozen_early` get lr 0 before step `frozen_early_steps`. Not decoupled (SGD): the decay was
    added to the gradient before the momentum, so here update = -lr(t) m_lr u."""
    frozen_early = [re.compile(str(r)) for r in optim_cfg.get("frozen_early", ()) or ()]
    until = int(optim_cfg.get("frozen_early_steps", 0))

    def init(params):
        del params
        return StepCount(jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        t = state.count
        lr, wd = lr_fn(t), wd_fn(t)
        lr_mult, wd_mult = lr_multipliers(optim_cfg, params), wd_multipliers(optim_cfg, params)

        def one(path, u, p):
            name = path_string(path)
            rate = lr
            if any(pattern.search(name) for pattern in frozen_early):
                rate = jnp.where(t < until, 0.0, rate)
            rate = rate * lr_mult[name]
            direction = u + (wd * wd_mult[name]) * p if decoupled else u
            return (-rate * direction).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), StepCount(t + 1)

    return optax.GradientTransformation(init, update)


def add_coupled_decay(optim_cfg, wd_fn) -> optax.GradientTransformation:
    """SGD's L2 decay: g + wd(t) m_wd p before the momentum (torch SGD weight_decay)."""

    def update(updates, state, params):
        wd, mult = wd_fn(state.count), wd_multipliers(optim_cfg, params)
        out = jax.tree_util.tree_map_with_path(lambda p, u, w: u + (wd * mult[path_string(p)]) * w, updates, params)
        return out, StepCount(state.count + 1)

    return optax.GradientTransformation(lambda params: StepCount(jnp.zeros((), jnp.int32)), update)


def make_optimizer(optim_cfg, total_steps: int, global_batch: int | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, lr schedule) from the `optim` block (module doc)."""
    name = str(optim_cfg.get("name", "adamw"))
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}; expected one of {OPTIMIZERS}")
    lr_fn = learning_rate_schedule(optim_cfg, total_steps, global_batch)
    wd_fn = weight_decay_schedule(optim_cfg, total_steps)
    b1, b2, eps = float(optim_cfg.b1), float(optim_cfg.b2), float(optim_cfg.eps)
    parts = []
    if float(optim_cfg.clip_norm) > 0:
        parts.append(clip_by_norm(float(optim_cfg.clip_norm), int(optim_cfg.get("clip_depth", 0))))
    if name == "adamw":
        parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), scale_by_lr_and_decay(optim_cfg, lr_fn, wd_fn)]
    elif name == "lion":
        parts += [optax.scale_by_lion(b1=b1, b2=b2), scale_by_lr_and_decay(optim_cfg, lr_fn, wd_fn)]
    else:
        parts += [add_coupled_decay(optim_cfg, wd_fn), optax.trace(decay=b1),
                  scale_by_lr_and_decay(optim_cfg, lr_fn, wd_fn, decoupled=False)]
    trained = optax.chain(*parts)
    if not optim_cfg.get("frozen", ()):
        return trained, lr_fn
    tx = optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(optim_cfg, params))
    return tx, lr_fn
