"""ViSD-Boost's PyTorch weights (Cao et al., ICCV 2025; alibaba-damo-academy/ViSD-Boost) -> medjax variables.

    params, report = medjax.convert.visd.load_with_report("checkpoint.pth", "checkpoint_vqvae.pth")
    python -m medjax.convert visd --torch checkpoint.pth --vqvae checkpoint_vqvae.pth --out params/visd
    python -m medjax.evaluate --exp visd_ctrate --variant full --checkpoint params/visd --data DIR

The released files are `{"model": state_dict}` of `VISDBOOST`, loaded by the original's eval.py with
`strict=False`: checkpoint_vqvae.pth first, then checkpoint.pth over it (the same here: a key in both takes
checkpoint.pth's tensor). The result is the `visd` task's params tree (medjax.tasks.visd) for the paper's
architecture (experiments/_visd.py "full"; the text tower's vocabulary, depth and positions read from the
checkpoint): {"model", "batch_stats", "codebook"}. Mapping:
  visual_encoder.res_model.*  -> model/vision/res_model (+ batch_stats: running_mean / running_var)
  visual_encoder.proj1..4     -> model/vision/proj1..4 (Conv3d 1x1x1 -> Dense)
  attention (nn.MultiheadAttention in_proj q|k|v, out_proj), query_tokens, res_projs1/2.{o}, vision_projs.{o}
                              -> model/vision/pooling (per-organ Linears stacked on a leading organ axis)
  id_projs, encoder.input1/2, encoder.transformer.layers.{i}.{0: norm, to_qkv (split q | k | v), to_out.0;
                              1: net.0/1/4} -> .../layers_{i}/{attn_norm, attn/{query, key, value, out}, ff_norm,
                              ff/{fc1, fc2}},
  encoder.transformer.norm, decoder.transformer..., decoder.output1/2 -> model/vision/vqvae
  vq_layer.embeddings, vq_layer.ema_dw.hidden, vq_layer.ema_cluster_size.hidden -> codebook (embeddings,
                              code_sum, cluster_size); the EMA step count is not saved by the original (a
                              Python counter): set to STEADY_COUNT, i.e. no bias correction on further updates
  text_encoder.* (BERT)       -> model/text (medjax.convert.hf.bert_map); text_proj, temp -> model/
Ignored: `num_batches_tracked`, the text encoder's pooler and cross-attention layers.
`resnet3d_from_torch(state_dict, prefix)`: a MedicalNet ResNet state dict (`conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, `layer2.0.downsample.0.weight` ...) -> {"params", "batch_stats"} of
`medjax.nn.resnet3d.ResNet3D`: Conv3d weight (out, in, kd, kh, kw) -> kernel (kd, kh, kw, in, out); BatchNorm
weight / bias -> scale / bias, running_mean / running_var -> batch_stats mean / var; `num_batches_tracked`
is not needed (momentum 0.1 is fixed).
"""
from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.convert import torch_io
from medjax.convert.torch_io import KeyReport, ParamMap

STEADY_COUNT = 1e4  # EMA steps assumed for a converted codebook: 0.99 ** 1e4 = 0 (no bias correction)
IGNORE = (r".*num_batches_tracked", r"text_encoder\.pooler\..*", r"text_encoder\..*crossattention.*")

_BLOCK = re.compile(r"^(layer\d+)\.(\d+)\.")


def _module_path(name: str) -> list[str]:
    """'layer2.0.downsample.1' -> ['layer2_0', 'downsample_1']."""
    name = _BLOCK.sub(lambda m: f"{m.group(1)}_{m.group(2)}.", name)
    return name.replace("downsample.", "downsample_").split(".")


def resnet3d_from_torch(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> dict:
    """{"params": ..., "batch_stats": ...} (nested dicts of numpy arrays) from the keys under `prefix`."""
    params, stats = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        module, _, leaf = key[len(prefix):].rpartition(".")
        path = tuple(_module_path(module))
        value = np.asarray(value)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and value.ndim == 5:
            params[path + ("kernel",)] = value.transpose(2, 3, 4, 1, 0)
        elif leaf in ("weight", "bias") and value.ndim == 1:
            params[path + ("scale" if leaf == "weight" else "bias",)] = value
        elif leaf in ("running_mean", "running_var"):
            stats[path + (leaf.removeprefix("running_"),)] = value
        else:
            raise ValueError(f"medjax/convert/visd.py: {key!r} (shape {value.shape}) is not a MedicalNet ResNet tensor")
    return {"params": traverse_util.unflatten_dict(params), "batch_stats": traverse_util.unflatten_dict(stats)}


def _model(vocab_size: int, text_depth: int, max_positions: int, organs: int = 4):
    """The paper's ViSD (experiments/_visd.py "full") with the checkpoint's text tower sizes."""
    from experiments._visd import visd_config
    from medjax.models import visd as visd_lib
    from medjax.nn.bert import BertEncoder

    m = visd_config("vlp", "full").model
    vision = visd_lib.ViSDVision(num_organs=organs, depth=m.depth, width=m.width, shortcut_type=m.shortcut_type,
                                 detach_shortcut=m.detach_shortcut, token_dim=m.token_dim, pool_heads=m.pool_heads,
                                 embed_dim=m.embed_dim, dropout=m.dropout, vq=m.vq.to_dict())
    text = BertEncoder(vocab_size=vocab_size, width=m.text_width, depth=text_depth, num_heads=m.text_heads,
                       mlp_dim=m.text_mlp_dim, max_positions=max_positions, add_pooling_layer=False)
    return visd_lib.ViSD(vision, text, embed_dim=m.embed_dim)


def param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened "params" path -> shape of `model` (a ViSD), abstractly (one 16 x 32 x 32 crop, 4 tokens)."""
    import flax.linen as nn

    from medjax.models.visd import STAGE_POOL

    volume = jnp.zeros((1,) + STAGE_POOL[-1] + (1,), jnp.float32)
    ids = jnp.zeros((1, model.vision.num_organs, 4), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), volume, volume[..., 0].astype(jnp.int32), ids,
                                                  jnp.ones_like(ids)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(variables["params"])).items()}


def _stack_organs(state: dict, name: str) -> None:
    """`name.{o}.weight/bias` (per-organ nn.Linear) -> `name.weight` (organs, out, in) / `name.bias` (organs, out)."""
    for leaf in ("weight", "bias"):
        keys = sorted((k for k in state if re.fullmatch(rf"{re.escape(name)}\.\d+\.{leaf}", k)),
                      key=lambda k: int(k.split(".")[-2]))
        if keys:
            state[f"{name}.{leaf}"] = np.stack([state.pop(k) for k in keys])


def _prepare(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(model tensors with the MHA in_proj split and per-organ Linears stacked, ResNet tensors)."""
    state = {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}
    resnet = {k: state.pop(k) for k in list(state) if k.startswith("visual_encoder.res_model.")}
    for leaf in ("weight", "bias"):
        key = f"attention.in_proj_{leaf}"
        if key in state:
            for name, part in zip(("q", "k", "v"), np.split(state.pop(key), 3)):
                state[f"attention.{name}_proj.{leaf}"] = part
    for name in ("res_projs1", "res_projs2", "vision_projs"):
        _stack_organs(state, name)
    for key in [k for k in state if k.endswith(".0.to_qkv.weight")]:  # vit-pytorch: to_qkv(x).chunk(3) = q, k, v
        for part, chunk in zip("qkv", np.split(state.pop(key), 3)):
            state[key.replace(".to_qkv.", f".to_{part}.")] = chunk
    return state, resnet


def _vae_layers(prefix: str, path: tuple, depth: int, shapes) -> dict[str, ParamMap]:
    cp, lin = torch_io.copy_param, torch_io.linear_param
    entries = {}
    for i in range(depth):
        src, dst = f"{prefix}.layers.{i}", path + (f"layers_{i}",)
        entries |= torch_io.layer_norm_params(f"{src}.0.norm", dst + ("attn_norm",), shapes)
        for part, name in zip("qkv", ("query", "key", "value")):  # `to_qkv` split by _prepare
            entries[f"{src}.0.to_{part}.weight"] = torch_io.heads_in_param(dst + ("attn", name, "kernel"), shapes)
        entries[f"{src}.0.to_out.0.weight"] = torch_io.heads_out_param(dst + ("attn", "out", "kernel"), shapes)
        entries[f"{src}.0.to_out.0.bias"] = cp(dst + ("attn", "out", "bias"), shapes)
        entries |= torch_io.layer_norm_params(f"{src}.1.net.0", dst + ("ff_norm",), shapes)
        entries[f"{src}.1.net.1.weight"], entries[f"{src}.1.net.1.bias"] = lin(dst + ("ff", "fc1", "kernel"), shapes), cp(
            dst + ("ff", "fc1", "bias"), shapes)
        entries[f"{src}.1.net.4.weight"], entries[f"{src}.1.net.4.bias"] = lin(dst + ("ff", "fc2", "kernel"), shapes), cp(
            dst + ("ff", "fc2", "bias"), shapes)
    entries |= torch_io.layer_norm_params(f"{prefix}.norm", path + ("norm",), shapes)
    return entries


def visd_map(model, shapes) -> dict[str, ParamMap]:
    """Prepared checkpoint key (`_prepare`) -> where it goes in `model`'s params (flattened `shapes`)."""
    from medjax.convert.hf import bert_map

    cp = torch_io.copy_param
    v, pool, vae = ("vision",), ("vision", "pooling"), ("vision", "vqvae")
    text_shapes = {k[1:]: s for k, s in shapes.items() if k[0] == "text"}
    entries = {f"text_encoder.{k}": ParamMap(("text",) + e.path, e.torch_shape, e.to_flax)
               for k, e in bert_map(model.text, text_shapes).items()}
    entries |= torch_io.linear_params("text_proj", ("text_proj",), shapes)
    entries["temp"] = cp(("temp",), shapes)
    for s in range(1, 5):
        kernel = tuple(shapes[v + (f"proj{s}", "kernel")])
        entries[f"visual_encoder.proj{s}.weight"] = ParamMap(v + (f"proj{s}", "kernel"), kernel[::-1] + (1, 1, 1),
                                                             lambda a: a.reshape(a.shape[:2]).T)
        entries[f"visual_encoder.proj{s}.bias"] = cp(v + (f"proj{s}", "bias"), shapes)
    for name, short in (("q", "query"), ("k", "key"), ("v", "value")):
        entries[f"attention.{name}_proj.weight"] = torch_io.heads_in_param(pool + (f"attn_{short}_kernel",), shapes)
        entries[f"attention.{name}_proj.bias"] = torch_io.heads_in_param(pool + (f"attn_{short}_bias",), shapes)
    entries["attention.out_proj.weight"] = torch_io.heads_out_param(pool + ("attn_out", "kernel"), shapes)
    entries["attention.out_proj.bias"] = cp(pool + ("attn_out", "bias"), shapes)
    entries["query_tokens"] = cp(pool + ("query_tokens",), shapes)
    for name in ("res_projs1", "res_projs2", "vision_projs"):
        kernel = tuple(shapes[pool + (f"{name}_kernel",)])
        entries[f"{name}.weight"] = ParamMap(pool + (f"{name}_kernel",), (kernel[0], kernel[2], kernel[1]),
                                             lambda a: a.transpose(0, 2, 1))
        entries[f"{name}.bias"] = cp(pool + (f"{name}_bias",), shapes)
    entries |= torch_io.linear_params("id_projs", vae + ("id_projs",), shapes)
    for name in ("input1", "input2"):
        entries |= torch_io.linear_params(f"encoder.{name}", vae + (f"encoder_{name}",), shapes)
    for name in ("output1", "output2"):
        entries |= torch_io.linear_params(f"decoder.{name}", vae + (f"decoder_{name}",), shapes)
    depth = dict(model.vision.vq or {}).get("depth", 2)
    entries |= _vae_layers("encoder.transformer", vae + ("encoder",), depth, shapes)
    entries |= _vae_layers("decoder.transformer", vae + ("decoder",), depth, shapes)
    return entries


def convert_state_dict(state: Mapping[str, np.ndarray], source: str = "checkpoint", model=None) -> tuple[dict, KeyReport]:
    """A VISDBOOST state dict -> ({"model", "batch_stats", "codebook"}, key report) (module docstring); `model`:
    the medjax.models.visd.ViSD to convert for (default: the paper's, text sizes from the checkpoint)."""
    state, resnet = _prepare(state)
    words = state.get("text_encoder.embeddings.word_embeddings.weight")
    positions = state.get("text_encoder.embeddings.position_embeddings.weight")
    if words is None or positions is None:
        raise ValueError(f"{source}: no text_encoder.embeddings.* tensors (not a ViSD-Boost VISDBOOST state dict)")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k)))
    model = model or _model(words.shape[0], depth, positions.shape[0])
    shapes = param_shapes(model)
    codebook_keys = {"vq_layer.embeddings": "embeddings", "vq_layer.ema_dw.hidden": "code_sum",
                     "vq_layer.ema_cluster_size.hidden": "cluster_size"}
    codebook = {}
    for key, name in codebook_keys.items():
        if key not in state:
            raise ValueError(f"{source}: {key} missing (the VQ codebook; pass checkpoint_vqvae.pth too)")
        codebook[name] = jnp.asarray(state.pop(key), jnp.float32)
    codebook["count"] = jnp.asarray(STEADY_COUNT, jnp.float32)
    mapped = {k: v for k, v in shapes.items() if k[:2] != ("vision", "res_model")}  # the backbone: by name below
    params, report = torch_io.apply_mapping(mapped, visd_map(model, mapped), state, source, ignore=IGNORE)
    backbone = resnet3d_from_torch(resnet, "visual_encoder.res_model.")
    params["vision"]["res_model"] = jax.tree.map(jnp.asarray, backbone["params"])
    out = {"model": params, "batch_stats": {"vision": {"res_model": jax.tree.map(jnp.asarray, backbone["batch_stats"])}},
           "codebook": {"vision": {"vqvae": {"vq_layer": codebook}}}}
    _check_backbone(model, out, source)
    return out, report


def _check_backbone(model, params: dict, source: str) -> None:
    """The ResNet tensors (converted by name, outside the key mapping) against the model's shapes."""
    want = {k[2:]: s for k, s in param_shapes(model).items() if k[:2] == ("vision", "res_model")}
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params["model"]["vision"]["res_model"]).items()}
    if want != got:
        diff = sorted("/".join(k) for k in set(want) ^ set(got)) + sorted(
            f"{'/'.join(k)} {got[k]} vs {want[k]}" for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"{source}: visual_encoder.res_model does not match MedicalNet ResNet-18: {', '.join(diff[:10])}")


def read_released(path: str) -> dict[str, np.ndarray]:
    """A released file's tensors: `torch.load(weights_only=True)` (no pickled code runs), its "model" entry when
    it has one (the released files), else the file itself as a state dict; `.safetensors` without torch."""
    if path.endswith(".safetensors"):
        return torch_io.read_safetensors(path)
    import os

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip / runtime errors of a bad file
        raise ValueError(f"{path}: torch.load(weights_only=True) failed: {error}") from error
    state = loaded.get("model", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected {{'model': state_dict}} or a state dict, got {type(loaded).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[key] = value.detach().cpu().float().numpy()
    return out


def load_with_report(checkpoint: str, vqvae_checkpoint: str | None = None) -> tuple[dict, KeyReport]:
    """Both released files merged as the original's eval.py loads them (module docstring)."""
    state = {}
    for path in ([vqvae_checkpoint] if vqvae_checkpoint else []) + [checkpoint]:
        state.update(read_released(path))
    return convert_state_dict(state, " + ".join(p for p in (vqvae_checkpoint, checkpoint) if p))
