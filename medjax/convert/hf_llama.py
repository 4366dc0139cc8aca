"""Hugging Face `llama` and `llava` directories -> `medjax.nn.llama.Llama` / `medjax.models.llava.Llava` and
their variables (safetensors read without torch; `medjax.convert.hf.load` dispatches here by `model_type`).

- `llama` (LlamaForCausalLM): `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
  `model.layers.N.mlp.{gate,up,down}_proj`, `model.layers.N.{input,post_attention}_layernorm`, `model.norm`,
  `lm_head` (absent when the embeddings are tied). nn.Linear weights (out, in) -> Dense kernels (in, out).
- `llava` (LlavaForConditionalGeneration), in any of its three key layouts, normalised by `llava_key`:
  `model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*` + `lm_head` (transformers
  5 in memory), `language_model.model.*` / `language_model.lm_head` / `vision_tower.*` (transformers 5 on disk),
  and `vision_tower.vision_model.*` (hub files of transformers 4). The vision tower is built only up to the
  feature layer (`vision_feature_layer`, -2: the penultimate layer's output); the checkpoint's later layers
  are listed in the report's `ignored`.
- Meta's original Llama / Llama 2 release (`params.json` + `consolidated.NN.pth`, or `.safetensors`, one file per
  model-parallel shard; `load_meta`): keys `tok_embeddings`, `layers.N.attention.w{q,k,v,o}`,
  `layers.N.feed_forward.w{1,3,2}` (gate, up, down), `attention_norm` / `ffn_norm`, `norm`, `output`, shards
  concatenated as Meta split them; its q/k rows interleave each head's rotary pairs, so they are permuted into
  the rotate_half layout (`meta_to_rotate_half`, the permutation of transformers' convert_llama_weights_to_hf).
Unsupported config features (rope scaling, attention / MLP biases, a layer list as feature layer) are
rejected naming config.json and the field.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from medjax.convert import hf
from medjax.convert.torch_io import (KeyReport, ParamMap, apply_mapping, copy_param, linear_param,
                                     read_state_dict, weight_file)
from medjax.models.llava import Llava
from medjax.nn import layer_stack, transformer
from medjax.nn.llama import Llama

Dtype = Any
STACK = "layers"
_log = logging.getLogger(__name__)

# transformers 5.23 LlamaConfig / LlavaConfig defaults.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, rms_norm_eps=1e-6, initializer_range=0.02, hidden_act="silu")
LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", multimodal_projector_bias=True)


def _optional_int(values: Mapping[str, Any], name: str, source: str) -> int | None:
    value = values.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{source}: field {name!r} must be a positive integer or null, got {value!r}")
    return value


def rope_theta(values: Mapping[str, Any], source: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (4.x); only the
    default (unscaled) rotary embedding is supported."""
    params = values.get("rope_parameters") or {}
    scaling = values.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ValueError(f"{source}: fields 'rope_parameters' / 'rope_scaling' must be JSON objects")
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"{source}: field 'rope_parameters.rope_type' is {kind!r}; only 'default' RoPE is "
                         "supported (Llama 2)")
    theta = params.get("rope_theta", values.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def llama_from_config(values: Mapping[str, Any], source: str, *, scan: bool | str | None = None,
                      dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Llama:
    field = hf._Config(values, LLAMA_DEFAULTS, source)
    for flag in ("attention_bias", "mlp_bias"):
        if values.get(flag, False):
            raise ValueError(f"{source}: field {flag!r} is true; Llama 2 has no biases and medjax supports none")
    if field("hidden_act") != "silu":
        raise ValueError(f"{source}: field 'hidden_act' is {field('hidden_act')!r}; Llama's SwiGLU uses 'silu'")
    tie = values.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"{source}: field 'tie_word_embeddings' must be a boolean, got {tie!r}")
    return Llama(vocab_size=field("vocab_size"), width=field("hidden_size"), depth=field("num_hidden_layers"),
                 num_heads=field("num_attention_heads"),
                 num_kv_heads=_optional_int(values, "num_key_value_heads", source),
                 head_dim=_optional_int(values, "head_dim", source), mlp_dim=field("intermediate_size"),
                 rms_norm_eps=field("rms_norm_eps"), rope_theta=rope_theta(values, source), tie_embeddings=tie,
                 init_std=field("initializer_range"), scan=scan, dtype=dtype, param_dtype=param_dtype)


def llama_shapes(model: Llama) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def llama_map(model: Llama, shapes) -> dict[str, ParamMap]:
    """HF LlamaForCausalLM key -> param path in the unrolled layout (`layers_{i}`)."""
    entries = {"model.embed_tokens.weight": copy_param(("embed_tokens", "embedding"), shapes),
               "model.norm.weight": copy_param(("norm", "weight"), shapes)}
    if not model.tie_embeddings:
        entries["lm_head.weight"] = linear_param(("lm_head", "kernel"), shapes)
    for i in range(model.depth):
        src, dst = f"model.layers.{i}", (f"layers_{i}",)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            entries[f"{src}.{norm}.weight"] = copy_param(dst + (norm, "weight"), shapes)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries[f"{src}.self_attn.{name}.weight"] = linear_param(dst + ("self_attn", name, "kernel"), shapes)
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries[f"{src}.mlp.{name}.weight"] = linear_param(dst + ("mlp", name, "kernel"), shapes)
    return entries


def _prefixed(mapping: Mapping[str, ParamMap], key_prefix: str, path_prefix: tuple[str, ...]) -> dict[str, ParamMap]:
    return {key_prefix + key: ParamMap(path_prefix + entry.path, entry.torch_shape, entry.to_flax)
            for key, entry in mapping.items()}


# (pattern, replacement) in order: the first that matches a key rewrites it to the canonical layout
# language_model.{model.*, lm_head.*} / vision_tower.<CLIPVisionModel's inner keys> / multi_modal_projector.*.
_LLAVA_KEYS = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^language_model\.lm_head\.", "language_model.lm_head."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "multi_modal_projector."),
)


def llava_key(key: str) -> str:
    """A LLaVA checkpoint key in any of the three layouts -> the canonical one (unknown keys unchanged)."""
    for pattern, replacement in _LLAVA_KEYS:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return key


def llava_from_config(config: Mapping[str, Any], source: str, *, scan: bool | str | None = None,
                      dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Llava:
    field = hf._Config(config, LLAVA_DEFAULTS, source)
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError(f"{source}: fields 'text_config' and 'vision_config' must be JSON objects")
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: field 'text_config.model_type' is {text.get('model_type')!r}; supported: 'llama'")
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"{source}: field 'vision_config.model_type' is {vision.get('model_type')!r}; supported: "
                         "'clip_vision_model'")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{source}: field 'vision_feature_layer' is {layer!r}; only one layer (an integer) is "
                         "supported")
    strategy = field("vision_feature_select_strategy")
    if strategy not in ("default", "full"):
        raise ValueError(f"{source}: field 'vision_feature_select_strategy' is {strategy!r}; expected 'default' "
                         "or 'full'")
    tower = hf.clip_vision_from_config(vision, f"{source} (vision_config)", projection_dim=None, dtype=dtype,
                                       param_dtype=param_dtype)
    depth = tower.depth + 1 + layer if layer < 0 else layer  # HF hidden_states[layer]: the output of `depth` layers
    if not 0 <= depth <= tower.depth:
        raise ValueError(f"{source}: field 'vision_feature_layer' is {layer}; the tower has {tower.depth} layers")
    tower = tower.clone(depth=depth)
    language = llama_from_config(text, f"{source} (text_config)", scan=scan, dtype=dtype, param_dtype=param_dtype)
    return Llava(vision_tower=tower, language_model=language, image_token_id=field("image_token_index"),
                 keep_class_token=strategy == "full", projector_act=field("projector_hidden_act"),
                 projector_bias=field("multimodal_projector_bias"), dtype=dtype, param_dtype=param_dtype)


def llava_shapes(model: Llava) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = model.vision_tower.image_size
    ids = jnp.zeros((1, model.num_image_tokens), jnp.int32).at[:].set(model.image_token_id)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.zeros((1, size, size, 3))))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _sub(shapes, name: str):
    return {path[1:]: shape for path, shape in shapes.items() if path[0] == name}


def llava_map(model: Llava, shapes) -> dict[str, ParamMap]:
    """Canonical LLaVA key (`llava_key`) -> param path; `shapes` in the unrolled layout."""
    vision = transformer.unrolled_shapes(_sub(shapes, "vision_tower"), hf.STACK)
    language = transformer.unrolled_shapes(_sub(shapes, "language_model"), STACK)
    entries = _prefixed(hf.clip_vision_map(model.vision_tower, vision, prefix=""), "vision_tower.", ("vision_tower",))
    entries |= _prefixed(llama_map(model.language_model, language), "language_model.", ("language_model",))
    for name in ("linear_1", "linear_2"):
        entries[f"multi_modal_projector.{name}.weight"] = linear_param(("multi_modal_projector", name, "kernel"),
                                                                        shapes)
        if model.projector_bias:
            entries[f"multi_modal_projector.{name}.bias"] = copy_param(("multi_modal_projector", name, "bias"), shapes)
    return entries


def load_with_report(path: str, *, scan: bool | str | None = None, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32) -> tuple[nn.Module, dict, KeyReport]:
    """(model, variables, key report) of a `llama` or `llava` directory."""
    config = hf.read_config(path)
    source = os.path.join(path, "config.json")
    kinds = dict(scan=scan, dtype=dtype, param_dtype=param_dtype)
    if config.get("model_type") == "llama":
        model = llama_from_config(config, source, **kinds)
        weights = weight_file(path)
        state = read_state_dict(weights)
        shapes = llama_shapes(model)
        mapping = llama_map(model, transformer.unrolled_shapes(shapes, STACK))
        params, report = apply_mapping(transformer.unrolled_shapes(shapes, STACK), mapping, state, weights,
                                       ignore=(r".*rotary_emb\.inv_freq",), param_dtype=param_dtype)
        if model.scanned:
            params = transformer.stack_layers(params, STACK)
        return model, {"params": params}, report
    model = llava_from_config(config, source, **kinds)
    weights = weight_file(path)
    state = {llava_key(key): value for key, value in read_state_dict(weights).items()}
    shapes = llava_shapes(model)
    unrolled = {("vision_tower",) + p: s for p, s in
                transformer.unrolled_shapes(_sub(shapes, "vision_tower"), hf.STACK).items()}
    unrolled |= {("language_model",) + p: s for p, s in
                 transformer.unrolled_shapes(_sub(shapes, "language_model"), STACK).items()}
    unrolled |= {p: s for p, s in shapes.items() if p[0] == "multi_modal_projector"}
    skipped = rf"vision_tower\.encoder\.layers\.(?:{'|'.join(str(i) for i in range(model.vision_tower.depth, 200))})\..*"
    params, report = apply_mapping(unrolled, llava_map(model, unrolled), state, weights,
                                   ignore=(skipped, r".*position_ids", r".*rotary_emb\.inv_freq"),
                                   param_dtype=param_dtype)
    if model.language_model.scanned:
        params["language_model"] = transformer.stack_layers(params["language_model"], STACK)
    if layer_stack.resolve_scan(model.vision_tower.scan, model.vision_tower.depth):
        params["vision_tower"] = transformer.stack_layers(params["vision_tower"], hf.STACK)
    if report.ignored:
        _log.info("%s: ignored %d tensors beyond the vision feature layer: %s", weights, len(report.ignored),
                  ", ".join(report.ignored))
    return model, {"params": params}, report


# ---- Meta's original checkpoints ----------------------------------------------------------------------
META_FILES = re.compile(r"^consolidated\.(\d+)\.(pth|safetensors)$")
# Meta key suffix -> (HF key suffix, the dim Meta's model-parallel shards split; None: replicated)
_META_LAYER = {"attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
               "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
               "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
               "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
               "attention_norm.weight": ("input_layernorm.weight", None),
               "ffn_norm.weight": ("post_attention_layernorm.weight", None)}
_META_TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
             "output.weight": ("lm_head.weight", 0)}


def meta_to_rotate_half(weight, num_heads: int):
    """q/k projection rows (heads * head_dim, in) from Meta's interleaved rotary layout (pairs (2i, 2i+1) of each
    head) to rotate_half's (i, i + head_dim / 2): view (heads, head_dim / 2, 2, in), swap the middle axes."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _meta_key(key: str, source: str) -> tuple[str, int | None] | None:
    if key in _META_TOP:
        return _META_TOP[key]
    match = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if match and match.group(2) in _META_LAYER:
        name, dim = _META_LAYER[match.group(2)]
        return f"model.layers.{match.group(1)}.{name}", dim
    if key == "rope.freqs" or key.endswith(".inner_attention.rope.freqs"):
        return None  # recomputed from rope_theta
    raise ValueError(f"{source}: key {key!r} is not a Meta Llama tensor")


def load_meta_with_report(path: str, *, scan: bool | str | None = None, dtype: Dtype = jnp.float32,
                          param_dtype: Dtype = jnp.float32) -> tuple[nn.Module, dict, KeyReport]:
    """(Llama, variables, key report) of a directory of Meta's original release (module doc)."""
    import json

    import numpy as np

    from medjax.convert.torch_io import read_weight_file

    source = os.path.join(path, "params.json")
    try:
        with open(source) as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: not a readable JSON object ({error})") from error
    files = sorted((f for f in os.listdir(path) if META_FILES.match(f)), key=lambda f: int(META_FILES.match(f)[1]))
    if not files:
        raise FileNotFoundError(f"{path}: no consolidated.NN.pth / consolidated.NN.safetensors beside params.json")
    for field in ("dim", "n_layers", "n_heads"):
        if not isinstance(meta.get(field), int) or meta[field] <= 0:
            raise ValueError(f"{source}: field {field!r} must be a positive integer, got {meta.get(field)!r}")
    shards = [read_weight_file(os.path.join(path, f)) for f in files]
    state, weights = {}, os.path.join(path, files[0])
    for key in shards[0]:
        target = _meta_key(key, weights)
        if target is None:
            continue
        name, dim = target
        parts = [np.asarray(shard[key]) for shard in shards]
        state[name] = parts[0] if dim is None or len(parts) == 1 else np.concatenate(parts, axis=dim)
    heads, kv_heads = meta["n_heads"], meta.get("n_kv_heads") or meta["n_heads"]
    for key in [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        state[key] = meta_to_rotate_half(state[key], heads if key.endswith("q_proj.weight") else kv_heads)
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{weights}: no 'tok_embeddings.weight'")
    mlp = state.get("model.layers.0.mlp.gate_proj.weight")
    config = {"model_type": "llama", "vocab_size": int(embed.shape[0]), "hidden_size": meta["dim"],
              "intermediate_size": int(mlp.shape[0]) if mlp is not None else 0, "num_hidden_layers": meta["n_layers"],
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "rms_norm_eps": float(meta.get("norm_eps", 1e-5)), "rope_theta": float(meta.get("rope_theta", 10000.0)),
              "tie_word_embeddings": "lm_head.weight" not in state}
    model = llama_from_config(config, source, scan=scan, dtype=dtype, param_dtype=param_dtype)
    shapes = llama_shapes(model)
    unrolled = transformer.unrolled_shapes(shapes, STACK)
    params, report = apply_mapping(unrolled, llama_map(model, unrolled), state, weights, param_dtype=param_dtype)
    if model.scanned:
        params = transformer.stack_layers(params, STACK)
    return model, {"params": params}, report
