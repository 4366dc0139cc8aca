"""PTUnifier's released PyTorch Lightning checkpoint (zhjohnchan/PTUnifier, `PTUnifierTransformerSS`) ->
`medjax.models.ptunifier.PTUnifier` params; and Hugging Face towers -> the PTUnifier vision / text towers.

    model, variables = medjax.convert.ptunifier.load("ptunifier.ckpt")      # Lightning {"state_dict": ...}
    python -m medjax.convert ptunifier --torch ptunifier.ckpt --out params/   # then --set init=params/

The state dict's key names are the LightningModule's: `vision_encoder.visual.*` (OpenAI CLIP ViT, fused
`attn.in_proj_weight`), `language_encoder.*` (HF RobertaModel), `multi_modal_{language,vision}_proj`,
`modality_type_embeddings`, `multi_modal_{language,vision}_layers.{i}` (METER BertCrossLayer),
`multi_modal_{language,vision}_pooler`, `mlm_head`, `itm_head`, `itc_head`, `pseudo_vision_token_pool`,
`pseudo_language_token_pool`, and a fine-tuned checkpoint's head: `vqa_head` / `cls_head` / `mlc_head`
(-> PTUnifierFinetune's task_head), `irtr_head` (-> the ITM head's "matched" row, which retrieval scores
with), `clm_proj` + `clm_head` (-> PTUnifierReportGen's decoder). The model's shape-defined fields (widths, depths, vocabulary, positions,
pool size, image size) are read from the tensors; head counts and the rest come from PTUNIFIER_FULL
or keyword overrides. A vision position table of another grid is resized bicubically to the model's
image size, as the original's `adapt_position_encoding`. Every missing or unexpected key and every shape
mismatch is reported by name; tensors the model does not use (CLIP's text-side leftovers, the RoBERTa
pooler, buffers, the MIM head) are skipped and listed in the report's `ignored`. The layers are
mapped onto the unrolled layout (`vision/layers_{i}`, `text/layers_{i}`) and stacked into `layers/...`
(leading layer axis) for a tower that the model's `scan` field (a keyword override here) scans.

Reading a Lightning `.ckpt` uses `torch.load(weights_only=True)`; when its pickled hyper-parameters hold
classes that mode refuses (e.g. sacred's ReadOnlyDict), pass `trust_pickle=True` (`--trust-pickle`)
only for a file from a trusted source, or save `ckpt["state_dict"]` alone once and convert that.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert import hf
from medjax.convert.torch_io import (KeyReport, ParamMap, apply_mapping, attention_params, check_keys, copy_param,
                                     layer_norm_params, linear_params, read_state_dict)
from medjax.models.ptunifier import PTUNIFIER_FULL, PTUnifier
from medjax.nn import transformer
from medjax.nn.clip_vit import resize_position_embedding

Dtype = Any
_log = logging.getLogger(__name__)
_VISUAL = "vision_encoder.visual."
_LAYOUT_FIELDS = ("scan",)  # how the towers' layers run (nn.scan), not the architecture
_IGNORED = (
    r"vision_encoder\.(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias))",  # CLIP text side
    r"language_encoder\.pooler\.dense\.(weight|bias)",  # RoBERTa's pooler: PTUnifier pools after fusion
    r".*\.position_ids", r".*\.token_type_ids",  # buffers
    r"mim_head\..*",  # MIM (not in the paper's objectives)
)
HEADS = ("vqa_head", "cls_head", "mlc_head")  # nn.Sequential(Linear, LayerNorm, GELU, Linear) -> task_head
_CLM = "clm_head.bert."


# ---- reading --------------------------------------------------------------------------------------

def read_lightning_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Tensors of a Lightning checkpoint's `state_dict` (or of a plain state dict / safetensors file)."""
    if not path.endswith((".ckpt", ".pth", ".pt", ".bin")):
        return read_state_dict(path)
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # pickle / zip / unsupported-global errors
        hint = "" if trust_pickle else (" If the file is from a trusted source, retry with trust_pickle=True "
                                        "(--trust-pickle), or save its ckpt['state_dict'] alone and convert that.")
        raise ValueError(f"{path}: torch.load failed: {error}.{hint}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' mapping or a state dict")
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        arrays[key] = value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return arrays


def config_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> dict:
    """The PTUnifier fields the tensors determine (widths, depths, vocabulary, grid, FFN sizes, and the pool size
    when the checkpoint has the pools: a METER checkpoint has none, convert_state_dict reports them)."""
    def shape(key):
        if key not in state:
            raise ValueError(f"{source}: key {key!r} is missing; cannot infer the model configuration")
        return tuple(state[key].shape)

    def count(pattern):
        return len({m.group(1) for k in state for m in [re.fullmatch(pattern, k)] if m})

    width, _, patch, _ = shape(f"{_VISUAL}conv1.weight")
    grid = round((shape(f"{_VISUAL}positional_embedding")[0] - 1) ** 0.5)
    vocab, text_width = shape("language_encoder.embeddings.word_embeddings.weight")
    pools = {"pool_size": shape("pseudo_vision_token_pool")[0]} if "pseudo_vision_token_pool" in state else {}
    return pools | dict(
        patch_size=patch, image_size=grid * patch, vision_width=width,
        vision_depth=count(rf"{re.escape(_VISUAL)}transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
        vision_mlp_dim=shape(f"{_VISUAL}transformer.resblocks.0.mlp.c_fc.weight")[0],
        vocab_size=vocab, text_width=text_width,
        text_depth=count(r"language_encoder\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight"),
        text_mlp_dim=shape("language_encoder.encoder.layer.0.intermediate.dense.weight")[0],
        max_positions=shape("language_encoder.embeddings.position_embeddings.weight")[0],
        roberta_positions=shape("language_encoder.embeddings.token_type_embeddings.weight")[0] == 1,
        hidden_size=shape("multi_modal_language_proj.weight")[0],
        fusion_layers=count(r"multi_modal_language_layers\.(\d+)\.attention\.self\.query\.weight"),
        fusion_mlp_dim=shape("multi_modal_language_layers.0.intermediate.dense.weight")[0],
    )


# ---- key mapping ----------------------------------------------------------------------------------

def _sub_shapes(shapes, prefix: tuple[str, ...]):
    return {path[len(prefix):]: s for path, s in shapes.items() if path[:len(prefix)] == prefix}


def _under(entries: Mapping[str, ParamMap], prefix: tuple[str, ...]) -> dict[str, ParamMap]:
    return {k: ParamMap(prefix + e.path, e.torch_shape, e.to_flax) for k, e in entries.items()}


def clip_visual_map(model: PTUnifier, shapes) -> dict[str, ParamMap]:
    """OpenAI CLIP `visual.*` (fused in_proj split into `.attn.q/k/v`) -> params under "vision"."""
    sub = _sub_shapes(shapes, ("vision",))
    p, w = model.patch_size, model.vision_width
    entries = {
        "class_embedding": copy_param(("class_embedding",), sub),
        "positional_embedding": copy_param(("position_embedding",), sub),
        # Conv2d weight (width, 3, p, p) -> kernel on (p, q, c)-ordered patch pixels (medjax.nn.vit.patchify).
        "conv1.weight": ParamMap(("patch_embed", "kernel"), (w, 3, p, p),
                                 lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * 3, w)),
    }
    entries |= layer_norm_params("ln_pre", ("ln_pre",), sub)
    entries |= layer_norm_params("ln_post", ("ln_post",), sub)
    for i in range(model.vision_depth):
        src, dst = f"transformer.resblocks.{i}", (f"layers_{i}",)
        names = {"query": f"{src}.attn.q", "key": f"{src}.attn.k", "value": f"{src}.attn.v",
                 "out": f"{src}.attn.out_proj"}
        entries |= attention_params(names, dst + ("attn",), sub)
        entries |= layer_norm_params(f"{src}.ln_1", dst + ("ln_1",), sub)
        entries |= layer_norm_params(f"{src}.ln_2", dst + ("ln_2",), sub)
        entries |= linear_params(f"{src}.mlp.c_fc", dst + ("fc1",), sub)
        entries |= linear_params(f"{src}.mlp.c_proj", dst + ("fc2",), sub)
    return {_VISUAL + k: e for k, e in _under(entries, ("vision",)).items()}


def co_attention_map(src: str, dst: tuple[str, ...], shapes) -> dict[str, ParamMap]:
    """METER `BertCrossLayer` at `src` -> `medjax.nn.co_attention.CoAttentionLayer` at `dst`."""
    entries = {}
    for torch_name, flax_name in (("attention", "self_attention"), ("crossattention", "cross_attention")):
        names = {n: f"{src}.{torch_name}.self.{n}" for n in ("query", "key", "value")}
        names["out"] = f"{src}.{torch_name}.output.dense"
        entries |= attention_params(names, dst + (flax_name,), shapes)
        entries |= layer_norm_params(f"{src}.{torch_name}.output.LayerNorm", dst + (f"{flax_name}_norm",), shapes)
    entries |= linear_params(f"{src}.intermediate.dense", dst + ("fc1",), shapes)
    entries |= linear_params(f"{src}.output.dense", dst + ("fc2",), shapes)
    entries |= layer_norm_params(f"{src}.output.LayerNorm", dst + ("output_norm",), shapes)
    return entries


def ptunifier_map(model: PTUnifier, shapes, task_head: str = "vqa_head") -> dict[str, ParamMap]:
    """Every PTUnifier param <- its Lightning state-dict key (fused CLIP in_proj shown split); `task_head`: the
    checkpoint's name of a fine-tuned classifier head (HEADS)."""
    text = SimpleNamespace(depth=model.text_depth, add_pooling_layer=False)
    entries = clip_visual_map(model, shapes)
    entries |= _under(hf.bert_map(text, _sub_shapes(shapes, ("text",)), "language_encoder."), ("text",))
    for stream, name in (("language", "text"), ("vision", "image")):
        entries |= linear_params(f"multi_modal_{stream}_proj", (f"{name}_proj",), shapes)
        entries |= linear_params(f"multi_modal_{stream}_pooler.dense", (f"{name}_pooler",), shapes)
        for i in range(model.fusion_layers):
            entries |= co_attention_map(f"multi_modal_{stream}_layers.{i}", (f"fusion_{i}", name), shapes)
    entries["modality_type_embeddings.weight"] = copy_param(("modality_type", "embedding"), shapes)
    entries |= linear_params("mlm_head.transform.dense", ("mlm_transform",), shapes)
    entries |= layer_norm_params("mlm_head.transform.LayerNorm", ("mlm_norm",), shapes)
    entries |= linear_params("mlm_head.decoder", ("mlm_decoder",), shapes, bias=False)
    entries["mlm_head.bias"] = copy_param(("mlm_bias",), shapes)
    entries |= linear_params("itm_head.fc", ("itm_head",), shapes)
    entries |= layer_norm_params("itc_head.vision_ln", ("itc_image_norm",), shapes)
    entries |= layer_norm_params("itc_head.language_ln", ("itc_text_norm",), shapes)
    entries |= linear_params("itc_head.vision_proj", ("itc_image_proj",), shapes, bias=False)
    entries |= linear_params("itc_head.language_proj", ("itc_text_proj",), shapes, bias=False)
    entries["pseudo_vision_token_pool"] = copy_param(("visual_prompts", "pool"), shapes)
    entries["pseudo_language_token_pool"] = copy_param(("textual_prompts", "pool"), shapes)
    return entries | finetuned_heads_map(model, shapes, task_head)


def finetuned_heads_map(model: PTUnifier, shapes, task_head: str = "vqa_head") -> dict[str, ParamMap]:
    """The fine-tuning heads the model has: `task_head` (`vqa_head` / `cls_head` / `mlc_head`) -> task_head (fc1, norm, fc2:
    the Sequential's 0, 1, 3), `clm_proj` -> clm_proj + clm_norm and `clm_head` (BertGenerationDecoder:
    RoBERTa embeddings, decoder layers with cross-attention, MLM head) -> report_decoder. (`irtr_head`, the
    fine-tuned retrieval score, is written into the ITM head's "matched" row by `convert_state_dict`.)"""
    entries = {}
    if getattr(model, "num_outputs", 0):
        name = task_head
        entries |= linear_params(f"{name}.0", ("task_head", "fc1"), shapes)
        entries |= layer_norm_params(f"{name}.1", ("task_head", "norm"), shapes)
        entries |= linear_params(f"{name}.3", ("task_head", "fc2"), shapes)
    if hasattr(model, "decoder_layers"):
        entries |= linear_params("clm_proj.0", ("clm_proj",), shapes)
        entries |= layer_norm_params("clm_proj.1", ("clm_norm",), shapes)
        dec = ("report_decoder",)
        for torch_name, flax_name in (("word_embeddings", "word_embeddings"), ("position_embeddings",
                                      "position_embeddings"), ("token_type_embeddings", "token_type_embeddings")):
            entries[f"{_CLM}embeddings.{torch_name}.weight"] = copy_param(dec + (flax_name, "embedding"), shapes)
        entries |= layer_norm_params(f"{_CLM}embeddings.LayerNorm", dec + ("embedding_norm",), shapes)
        for i in range(model.decoder_layers):
            entries |= co_attention_map(f"{_CLM}encoder.layer.{i}", dec + (f"layers_{i}",), shapes)
        entries |= linear_params("clm_head.lm_head.transform.dense", dec + ("lm_transform",), shapes)
        entries |= layer_norm_params("clm_head.lm_head.transform.LayerNorm", dec + ("lm_norm",), shapes)
        entries |= linear_params("clm_head.lm_head.decoder", dec + ("lm_decoder",), shapes, bias=False)
        entries["clm_head.lm_head.bias"] = copy_param(dec + ("lm_bias",), shapes)
    return entries


def param_shapes(model: PTUnifier) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path -> shape of `model.init` in the model's layout, computed abstractly."""
    images = jax.ShapeDtypeStruct((2, model.image_size, model.image_size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    abstract = jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t, t), images, ids)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}


def _fused_shapes(model: PTUnifier, mapping: Mapping[str, ParamMap]) -> dict[str, tuple[int, ...]]:
    """Expected checkpoint key -> shape, with CLIP's fused `attn.in_proj_*` as the checkpoint holds it."""
    split = re.compile(rf"{re.escape(_VISUAL)}transformer\.resblocks\.\d+\.attn\.[qkv]\.(weight|bias)")
    expected = {k: e.torch_shape for k, e in mapping.items() if not split.fullmatch(k)}
    w = model.vision_width
    for i in range(model.vision_depth):
        expected[f"{_VISUAL}transformer.resblocks.{i}.attn.in_proj_weight"] = (3 * w, w)
        expected[f"{_VISUAL}transformer.resblocks.{i}.attn.in_proj_bias"] = (3 * w,)
    return expected


def _split_in_proj(state: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    state = dict(state)
    for i in range(depth):
        src = f"{_VISUAL}transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", np.split(np.asarray(state.pop(f"{src}.in_proj_{kind}")), 3, axis=0)):
                state[f"{src}.{name}.{kind}"] = part
    return state


def _resize_positions(state: dict[str, np.ndarray], model: PTUnifier) -> dict[str, np.ndarray]:
    key = f"{_VISUAL}positional_embedding"
    grid = model.image_size // model.patch_size
    if key in state and state[key].ndim == 2 and state[key].shape[0] != grid * grid + 1:
        state = dict(state)
        state[key] = np.asarray(resize_position_embedding(jnp.asarray(state[key], jnp.float32), (grid, grid)))
    return state


def convert_state_dict(state: Mapping[str, np.ndarray], model: PTUnifier, source: str, *,
                       param_dtype: Dtype = jnp.float32, absent: Iterable[str] = (),
                       ignore: Iterable[str] = ()) -> tuple[dict, KeyReport]:
    """A PTUnifier Lightning state dict -> params of `model`; raises naming every key problem. `absent`:
    regular expressions of expected keys the checkpoint may lack (e.g. METER has no ITC head nor prompt
    pools): their params are left out of the result (`--set init=` keeps the model's initialisation for
    them) and listed in the report's `absent`; `ignore`: more patterns of checkpoint keys to skip."""
    state = _resize_positions(dict(state), model)
    layout = param_shapes(model)
    shapes = transformer.unrolled_shapes(layout, hf.STACK)  # the checkpoint's layer i -> layers_{i}
    mapping = ptunifier_map(model, shapes, next((h for h in HEADS if f"{h}.3.weight" in state), "vqa_head"))
    patterns = [re.compile(p) for p in absent]
    left_out = sorted(k for k in mapping if k not in state and any(p.fullmatch(k) for p in patterns))
    if left_out:
        paths = {mapping[k].path for k in left_out}
        mapping = {k: e for k, e in mapping.items() if k not in left_out}
        shapes = {p: s for p, s in shapes.items() if p not in paths}
        layout = {p: s for p, s in layout.items() if p not in paths}
    expected = _fused_shapes(model, mapping)
    irtr = {k: state[k] for k in ("irtr_head.weight", "irtr_head.bias") if k in state}
    if irtr:  # Linear(2H, 1), initialised from and replacing the ITM head's "matched" row
        expected |= {"irtr_head.weight": (1, 2 * model.hidden_size), "irtr_head.bias": (1,)}
    report = check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, ignore=(*_IGNORED, *ignore))
    report.raise_if_problems(source)
    report = dataclasses.replace(report, absent=tuple(left_out))
    used = _split_in_proj({k: v for k, v in state.items() if k not in report.ignored and k not in irtr},
                          model.vision_depth)
    params, _ = apply_mapping(shapes, mapping, used, source, param_dtype=param_dtype)
    if irtr:
        itm = dict(params["itm_head"])
        itm["kernel"] = itm["kernel"].at[:, 1].set(jnp.asarray(irtr["irtr_head.weight"][0], itm["kernel"].dtype))
        itm["bias"] = itm["bias"].at[1].set(jnp.asarray(irtr["irtr_head.bias"][0], itm["bias"].dtype))
        params = dict(params, itm_head=itm)
    # layers_{i} -> one scanned `layers` (axis 0: the layer) in each tower the model scans
    return transformer.match_layer_layout(params, traverse_util.unflatten_dict(layout), hf.STACK), report


def model_for_state_dict(state: Mapping[str, np.ndarray], fields: dict, *, mode: str = "vision",
                         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> PTUnifier:
    """The model a checkpoint's heads call for: PTUnifierReportGen (`clm_head`; `mode`: its input path, which
    the weights do not tell), PTUnifierFinetune with a task head of the `vqa_head` / `cls_head` / `mlc_head`'s
    classes, else the pretraining PTUnifier."""
    from medjax.models.ptunifier_finetune import PTUnifierFinetune
    from medjax.models.ptunifier_reportgen import PTUnifierReportGen

    kinds = dict(dtype=dtype, param_dtype=param_dtype)
    if "clm_proj.0.weight" in state:
        layers = len({m.group(1) for k in state for m in [re.fullmatch(rf"{re.escape(_CLM)}encoder\.layer\.(\d+)\..*", k)]
                      if m})
        return PTUnifierReportGen(**fields, mode=mode, decoder_layers=layers, **kinds)
    heads = [h for h in HEADS if f"{h}.3.weight" in state]
    if len(heads) > 1:
        raise ValueError(f"medjax/convert/ptunifier.py: the checkpoint holds several task heads {heads}; expected one")
    if heads:
        return PTUnifierFinetune(**fields, num_outputs=int(state[f"{heads[0]}.3.weight"].shape[0]), **kinds)
    return PTUnifier(**fields, **kinds)


def load_with_report(path: str, *, trust_pickle: bool = False, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32, mode: str = "vision", **overrides
                     ) -> tuple[PTUnifier, dict, KeyReport]:
    """`load`, also returning the key report."""
    state = read_lightning_state_dict(path, trust_pickle=trust_pickle)
    unknown = sorted(set(overrides) - set(PTUNIFIER_FULL) - set(_LAYOUT_FIELDS))
    if unknown:
        raise ValueError(f"medjax/convert/ptunifier.py: unknown model field(s) {unknown}; "
                         f"fields: {sorted(PTUNIFIER_FULL) + list(_LAYOUT_FIELDS)}")
    fields = {**PTUNIFIER_FULL, **config_from_state_dict(state, path), **overrides}
    model = model_for_state_dict(state, fields, mode=mode, dtype=dtype, param_dtype=param_dtype)
    params, report = convert_state_dict(state, model, path, param_dtype=param_dtype)
    if report.ignored:
        _log.info("%s: ignored %d tensors not part of the pretraining model: %s", path, len(report.ignored),
                  ", ".join(report.ignored))
    return model, {"params": params}, report


def load(path: str, *, trust_pickle: bool = False, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         mode: str = "vision", **overrides) -> tuple[PTUnifier, dict]:
    """(model, variables) from a PTUnifier Lightning checkpoint, pretrained or fine-tuned (model_for_state_dict);
    `overrides` of PTUNIFIER_FULL's fields (e.g. image_size=384 resizes the position table for fine-tuning)
    and `scan` (the towers' layer layout); `mode` for a report-generation checkpoint."""
    model, variables, _ = load_with_report(path, trust_pickle=trust_pickle, dtype=dtype, param_dtype=param_dtype,
                                           mode=mode, **overrides)
    return model, variables


# ---- Hugging Face towers -> PTUnifier towers -------------------------------------------------------

def _take_tower(ours: dict, theirs: dict, source: str, tower: str) -> tuple[dict, list[str]]:
    """`ours` (one tower's flat params) with every leaf from `theirs`; position tables are resized and
    extra source leaves (e.g. CLIP's 12th block when the tower keeps 11, a pooler) are listed as skipped."""
    flat_ours, flat_theirs = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(theirs)
    missing = sorted("/".join(p) for p in flat_ours if p not in flat_theirs)
    if missing:
        raise ValueError(f"{source}: the {tower} tower needs params the checkpoint lacks: {', '.join(missing)}")
    taken, problems = {}, []
    for path, leaf in flat_ours.items():
        value = np.asarray(flat_theirs[path])
        if path == ("position_embedding",) and value.shape != leaf.shape and value.ndim == 2:
            grid = round((leaf.shape[0] - 1) ** 0.5)
            value = np.asarray(resize_position_embedding(jnp.asarray(value, jnp.float32), (grid, grid)))
        if value.shape != leaf.shape:
            problems.append(f"{'/'.join(path)} has shape {value.shape}, expected {leaf.shape}")
        taken[path] = value.astype(np.asarray(leaf).dtype)
    if problems:
        raise ValueError(f"{source}: {tower} tower shape mismatches: " + "; ".join(problems))
    skipped = sorted("/".join(p) for p in flat_theirs if p not in flat_ours)
    return traverse_util.unflatten_dict(taken), skipped


def init_towers_from_hf(params: dict, *, vision: str = "", text: str = "") -> tuple[dict, list[str]]:
    """Unboxed PTUnifier `params` with the "vision" tower from a local HF CLIP (vision) directory and/or the
    "text" tower from a local HF RoBERTa/BERT directory (`medjax.convert.hf.load`); also the skipped leaves.
    A scanned tower (`layers/...`) is filled layer by layer and stacked again."""
    params, notes = dict(params), []
    for tower, path in (("vision", vision), ("text", text)):
        if not path:
            continue
        config = hf.read_config(path)
        _, variables = hf.load(path, tower="vision" if config.get("model_type") == "clip" else None)
        ours = jax.device_get(params[tower])
        scanned = hf.STACK in ours
        ours = transformer.unstack_layers(ours, hf.STACK) if scanned else ours
        taken, skipped = _take_tower(ours, variables["params"], path, tower)
        params[tower] = transformer.stack_layers(taken, hf.STACK) if scanned else taken
        notes += [f"{path}: {s} (not used)" for s in skipped]
    return params, notes
