"""Hugging Face directories -> medjax Flax modules and variables (no transformers or torch needed for
`.safetensors`; `pytorch_model.bin` needs the torch extra).

    model, variables = medjax.convert.hf.load("clip-vit-base-patch16/", tower="vision")
    last_hidden_state = model.apply(variables, pixels)                      # pixels (batch, H, W, 3)
    model, variables = medjax.convert.hf.load("roberta-base/")
    last_hidden_state = model.apply(variables, input_ids, attention_mask)
    model, variables = medjax.convert.hf.load("clip-vit-base-patch32/", tower="text")
    text_embeds = model.apply(variables, input_ids, attention_mask, method=model.text_embeds)
    pooled = model.apply(variables, input_ids, attention_mask, method=model.pooled_output)

The directory's `config.json` `model_type` selects the family:
- `clip_vision_model` (CLIPVisionModel[WithProjection]) -> `CLIPVisionTransformer`
- `clip_text_model` (CLIPTextModel[WithProjection]) -> `CLIPTextTransformer`
- `clip` (CLIPModel; pass `tower="vision"` or `"text"`) -> one tower with its projection
- `bert`, `roberta` (BertModel, RobertaModel, or a *For... model whose `bert.` / `roberta.` part is used)
    -> `BertEncoder`
- `llama` (LlamaForCausalLM) -> `medjax.nn.llama.Llama`; `llava` (LlavaForConditionalGeneration) ->
    `medjax.models.llava.Llava` (medjax/convert/hf_llama.py)
A projection (pooler) is part of the model exactly when the checkpoint holds its weights. Config
fields absent from `config.json` take transformers 5.23's defaults. `scan=True` (or None: auto, >= 12
layers) builds the model with its layers under one `nn.scan` (`medjax.nn.transformer`): the checkpoint's
`layer.{i}` tensors are mapped onto `layers_{i}` and stacked into `layers/...` with a leading layer axis.
Every missing or unexpected checkpoint key and every shape mismatch is reported by name; keys of other
heads / the other CLIP tower and legacy buffers (`position_ids`) are skipped and listed in the returned
`KeyReport.ignored`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert.torch_io import (KeyReport, ParamMap, apply_mapping, attention_params, copy_param,
                                     layer_norm_params, linear_params, read_state_dict, weight_file)
from medjax.nn import layer_stack, transformer
from medjax.nn.bert import BertEncoder
from medjax.nn.clip_text import CLIPTextTransformer
from medjax.nn.clip_vit import ACTIVATIONS, CLIPVisionTransformer

Dtype = Any
SUPPORTED_MODEL_TYPES = ("clip_vision_model", "clip_text_model", "clip", "bert", "roberta")
CLIP_TOWERS = ("vision", "text")
STACK = "layers"  # the layer stack of CLIPVisionTransformer, CLIPTextTransformer and BertEncoder
_BUFFERS = (r".*\.position_ids", r".*\.token_type_ids")  # non-persistent buffers older versions saved
_log = logging.getLogger(__name__)

# transformers 5.23 config defaults (CLIPVisionConfig, CLIPTextConfig, BertConfig, RobertaConfig).
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                          num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, eos_token_id=49407)
BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                     layer_norm_eps=1e-12, pad_token_id=0)
ROBERTA_DEFAULTS = dict(BERT_DEFAULTS, vocab_size=50265, pad_token_id=1)
CLIP_DEFAULTS = dict(projection_dim=512)


class _Config:
    """Typed access to one config dict; errors name the file and the field."""

    def __init__(self, values: Mapping[str, Any], defaults: Mapping[str, Any], source: str):
        self.values, self.defaults, self.source = values, defaults, source

    def __call__(self, name: str) -> Any:
        value = self.values.get(name, self.defaults[name])
        default = self.defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"{self.source}: field {name!r} must be {type(default).__name__}, got {value!r}")
        if name == "hidden_act" and value not in ACTIVATIONS:
            raise ValueError(f"{self.source}: field 'hidden_act' is {value!r}; supported: {sorted(ACTIVATIONS)}")
        return value


def read_config(path: str) -> dict:
    """The JSON object in `path/config.json`."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found; expected a Hugging Face model directory with a config.json")
    try:
        with open(file) as handle:
            config = json.load(handle)
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


# ---- Model construction from configs ---------------------------------------------------------------

def clip_vision_from_config(values: Mapping[str, Any], source: str, *, projection_dim: int | None,
                            scan: bool | str | None = False, dtype: Dtype = jnp.float32,
                            param_dtype: Dtype = jnp.float32) -> CLIPVisionTransformer:
    field = _Config(values, CLIP_VISION_DEFAULTS, source)
    return CLIPVisionTransformer(
        image_size=field("image_size"), patch_size=field("patch_size"), width=field("hidden_size"),
        depth=field("num_hidden_layers"), num_heads=field("num_attention_heads"),
        mlp_dim=field("intermediate_size"), num_channels=field("num_channels"), hidden_act=field("hidden_act"),
        layer_norm_eps=field("layer_norm_eps"), attention_dropout=field("attention_dropout"),
        projection_dim=projection_dim, scan=scan, dtype=dtype, param_dtype=param_dtype)


def clip_text_from_config(values: Mapping[str, Any], source: str, *, projection_dim: int | None,
                          scan: bool | str | None = False, dtype: Dtype = jnp.float32,
                          param_dtype: Dtype = jnp.float32) -> CLIPTextTransformer:
    field = _Config(values, CLIP_TEXT_DEFAULTS, source)
    return CLIPTextTransformer(
        vocab_size=field("vocab_size"), width=field("hidden_size"), depth=field("num_hidden_layers"),
        num_heads=field("num_attention_heads"), mlp_dim=field("intermediate_size"),
        max_length=field("max_position_embeddings"), hidden_act=field("hidden_act"),
        layer_norm_eps=field("layer_norm_eps"), attention_dropout=field("attention_dropout"),
        eos_token_id=field("eos_token_id"), projection_dim=projection_dim, scan=scan, dtype=dtype,
        param_dtype=param_dtype)


def bert_from_config(values: Mapping[str, Any], source: str, *, roberta: bool, add_pooling_layer: bool,
                     scan: bool | str | None = False, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32) -> BertEncoder:
    field = _Config(values, ROBERTA_DEFAULTS if roberta else BERT_DEFAULTS, source)
    for flag in ("is_decoder", "add_cross_attention"):
        if values.get(flag, False):
            raise ValueError(f"{source}: field {flag!r} is true; only the bidirectional encoder is supported")
    position_type = values.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{source}: field 'position_embedding_type' is {position_type!r}; only 'absolute' is "
                         "supported")
    return BertEncoder(
        vocab_size=field("vocab_size"), width=field("hidden_size"), depth=field("num_hidden_layers"),
        num_heads=field("num_attention_heads"), mlp_dim=field("intermediate_size"),
        max_positions=field("max_position_embeddings"), type_vocab_size=field("type_vocab_size"),
        hidden_act=field("hidden_act"), layer_norm_eps=field("layer_norm_eps"),
        hidden_dropout=field("hidden_dropout_prob"), attention_dropout=field("attention_probs_dropout_prob"),
        position_padding_idx=field("pad_token_id") if roberta else None, add_pooling_layer=add_pooling_layer,
        scan=scan, dtype=dtype, param_dtype=param_dtype)


# ---- Checkpoint name -> Flax param mapping -----------------------------------------------------------

def _clip_layers(prefix: str, depth: int, shapes) -> dict[str, ParamMap]:
    """HF `CLIPEncoderLayer`s -> medjax blocks of the unrolled layout (layers_i/ln_1, attn, ln_2, fc1, fc2);
    `shapes`: `transformer.unrolled_shapes` of the model's."""
    entries = {}
    for i in range(depth):
        src, dst = f"{prefix}encoder.layers.{i}", (f"layers_{i}",)
        entries |= layer_norm_params(f"{src}.layer_norm1", dst + ("ln_1",), shapes)
        names = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
        entries |= attention_params({n: f"{src}.self_attn.{m}" for n, m in names.items()}, dst + ("attn",), shapes)
        entries |= layer_norm_params(f"{src}.layer_norm2", dst + ("ln_2",), shapes)
        entries |= linear_params(f"{src}.mlp.fc1", dst + ("fc1",), shapes)
        entries |= linear_params(f"{src}.mlp.fc2", dst + ("fc2",), shapes)
    return entries


def clip_vision_map(model: CLIPVisionTransformer, shapes, prefix: str = "vision_model.") -> dict[str, ParamMap]:
    """`prefix`: "vision_model." (CLIPModel, *WithProjection, transformers 4) or "" (5.x CLIPVisionModel)."""
    patch = ("patch_embed", "kernel")
    p, c = model.patch_size, model.num_channels
    entries = {
        f"{prefix}embeddings.class_embedding": copy_param(("class_embedding",), shapes),
        # Conv2d weight (width, c, p, p) -> kernel on (p, q, c)-ordered patch pixels (medjax.nn.vit.patchify).
        f"{prefix}embeddings.patch_embedding.weight": ParamMap(
            patch, (model.width, c, p, p), lambda a: a.transpose(2, 3, 1, 0).reshape(shapes[patch])),
        f"{prefix}embeddings.position_embedding.weight": copy_param(("position_embedding",), shapes),
    }
    entries |= layer_norm_params(f"{prefix}pre_layrnorm", ("ln_pre",), shapes)
    entries |= _clip_layers(prefix, model.depth, shapes)
    entries |= layer_norm_params(f"{prefix}post_layernorm", ("ln_post",), shapes)
    if model.projection_dim is not None:
        entries |= linear_params("visual_projection", ("projection",), shapes, bias=False)
    return entries


def clip_text_map(model: CLIPTextTransformer, shapes, prefix: str = "text_model.") -> dict[str, ParamMap]:
    """`prefix`: "text_model." (CLIPModel, *WithProjection, transformers 4) or "" (5.x CLIPTextModel)."""
    entries = {
        f"{prefix}embeddings.token_embedding.weight": copy_param(("token_embedding", "embedding"), shapes),
        f"{prefix}embeddings.position_embedding.weight": copy_param(("position_embedding",), shapes),
    }
    entries |= _clip_layers(prefix, model.depth, shapes)
    entries |= layer_norm_params(f"{prefix}final_layer_norm", ("ln_final",), shapes)
    if model.projection_dim is not None:
        entries |= linear_params("text_projection", ("projection",), shapes, bias=False)
    return entries


def bert_map(model: BertEncoder, shapes, prefix: str = "") -> dict[str, ParamMap]:
    """`prefix`: "" (BertModel / RobertaModel) or "bert." / "roberta." (BertFor... / RobertaFor... models)."""
    hf = f"{prefix}embeddings"
    entries = {f"{hf}.{name}.weight": copy_param((name, "embedding"), shapes)
               for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    entries |= layer_norm_params(f"{hf}.LayerNorm", ("embedding_norm",), shapes)
    for i in range(model.depth):
        src, dst = f"{prefix}encoder.layer.{i}", (f"layers_{i}",)
        names = {"query": "self.query", "key": "self.key", "value": "self.value", "out": "output.dense"}
        entries |= attention_params({n: f"{src}.attention.{m}" for n, m in names.items()}, dst + ("attention",),
                                    shapes)
        entries |= layer_norm_params(f"{src}.attention.output.LayerNorm", dst + ("attention_norm",), shapes)
        entries |= linear_params(f"{src}.intermediate.dense", dst + ("fc1",), shapes)
        entries |= linear_params(f"{src}.output.dense", dst + ("fc2",), shapes)
        entries |= layer_norm_params(f"{src}.output.LayerNorm", dst + ("output_norm",), shapes)
    if model.add_pooling_layer:
        entries |= linear_params(f"{prefix}pooler.dense", ("pooler",), shapes)
    return entries


# ---- Conversion ------------------------------------------------------------------------------------

def param_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of `model.init` in the model's layout (scanned: `layers/...` with a
    leading layer axis), computed abstractly (no arrays allocated)."""
    if isinstance(model, CLIPVisionTransformer):
        args = (jnp.zeros((1, model.image_size, model.image_size, model.num_channels), jnp.float32),)
    else:
        args = (jnp.zeros((1, 1), jnp.int32),)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _rename_legacy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TF-era LayerNorm names (`LayerNorm.gamma` / `.beta`) -> `.weight` / `.bias`, as transformers does."""
    return {re.sub(r"(LayerNorm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm)\.beta$", r"\1.bias", key)): value
            for key, value in state.items()}


def _key_prefix(state: Mapping[str, np.ndarray], prefix: str) -> str:
    """`prefix` when the checkpoint's keys are nested under it (e.g. `bert.` in BertForMaskedLM,
    `text_model.` in CLIPModel / CLIPTextModelWithProjection / transformers-4 CLIPTextModel), else ''."""
    return prefix if any(key.startswith(prefix) for key in state) else ""


def load_with_report(path: str, tower: str | None = None, *, scan: bool | str | None = False,
                     dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> tuple[nn.Module, dict, KeyReport]:
    """`load`, also returning the key report (its `ignored` lists the checkpoint keys not used)."""
    if tower is None and os.path.isfile(os.path.join(path, "params.json")) \
            and not os.path.isfile(os.path.join(path, "config.json")):  # Meta's original Llama release
        from medjax.convert import hf_llama
        return hf_llama.load_meta_with_report(path, scan=scan, dtype=dtype, param_dtype=param_dtype)
    config = read_config(path)
    source = os.path.join(path, "config.json")
    model_type = config.get("model_type")
    if model_type in ("llama", "llava") and tower is None:  # decoder families: medjax/convert/hf_llama.py
        from medjax.convert import hf_llama  # imported here: hf_llama builds on this module
        return hf_llama.load_with_report(path, scan=scan, dtype=dtype, param_dtype=param_dtype)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: field 'model_type' is {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "clip":
        if tower not in CLIP_TOWERS:
            raise ValueError(f"{source}: a full CLIP directory holds two towers; pass tower= one of "
                             f"{CLIP_TOWERS} (got {tower!r})")
        sub_key = f"{tower}_config"
        sub_config = config.get(sub_key) or {}
        if not isinstance(sub_config, dict):
            raise ValueError(f"{source}: field {sub_key!r} must be a JSON object, got {sub_config!r}")
        sub_source = f"{source} ({sub_key})"
        projection_dim = _Config(config, CLIP_DEFAULTS, source)("projection_dim")
    elif tower is not None:
        raise ValueError(f"{source}: tower={tower!r} applies only to model_type 'clip', not {model_type!r}")
    elif model_type in ("clip_vision_model", "clip_text_model"):
        tower = "vision" if model_type == "clip_vision_model" else "text"
        sub_config, sub_source = config, source
        defaults = CLIP_VISION_DEFAULTS if tower == "vision" else CLIP_TEXT_DEFAULTS
        projection_dim = _Config(config, defaults, source)("projection_dim")

    weights = weight_file(path)
    state = _rename_legacy(read_state_dict(weights))
    ignore = _BUFFERS
    kinds = dict(scan=scan, dtype=dtype, param_dtype=param_dtype)
    if tower == "vision":
        if model_type == "clip":  # the text tower and the contrastive temperature
            ignore += (r"text_model\..*", r"text_projection\.weight", r"logit_scale")
        projection = projection_dim if "visual_projection.weight" in state else None
        model = clip_vision_from_config(sub_config, sub_source, projection_dim=projection, **kinds)
        shapes = transformer.unrolled_shapes(param_shapes(model), STACK)
        mapping = clip_vision_map(model, shapes, _key_prefix(state, "vision_model."))
    elif tower == "text":
        if model_type == "clip":
            ignore += (r"vision_model\..*", r"visual_projection\.weight", r"logit_scale")
        projection = projection_dim if "text_projection.weight" in state else None
        model = clip_text_from_config(sub_config, sub_source, projection_dim=projection, **kinds)
        shapes = transformer.unrolled_shapes(param_shapes(model), STACK)
        mapping = clip_text_map(model, shapes, _key_prefix(state, "text_model."))
    else:
        prefix = _key_prefix(state, f"{model_type}.")
        if prefix:
            ignore += (rf"(?!{re.escape(prefix)}).*",)  # heads of BertFor* / RobertaFor* models
        model = bert_from_config(config, source, roberta=model_type == "roberta",
                                 add_pooling_layer=f"{prefix}pooler.dense.weight" in state, **kinds)
        shapes = transformer.unrolled_shapes(param_shapes(model), STACK)
        mapping = bert_map(model, shapes, prefix)
    params, report = apply_mapping(shapes, mapping, state, weights, ignore=ignore, param_dtype=param_dtype)
    if layer_stack.resolve_scan(model.scan, model.depth):
        params = transformer.stack_layers(params, STACK)  # layers_{i}/... -> layers/... (axis 0: the layer)
    if report.ignored:
        _log.info("%s: ignored %d checkpoint tensors not part of the %s model: %s", weights, len(report.ignored),
                  type(model).__name__, ", ".join(report.ignored))
    return model, {"params": params}, report


def load(path: str, tower: str | None = None, *, scan: bool | str | None = False, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> tuple[nn.Module, dict]:
    """(model, variables) from a local Hugging Face directory (config.json + weights); see the module doc.

    `tower` ("vision" | "text") is required for a full CLIP directory and rejected otherwise. `scan`: the
    model's layer layout (False: `layers_{i}`; True, or None for >= 12 layers: one scanned `layers` with a
    leading layer axis). `dtype` is the modules' compute dtype, `param_dtype` the dtype of the returned params.
    """
    model, variables, _ = load_with_report(path, tower, scan=scan, dtype=dtype, param_dtype=param_dtype)
    return model, variables
