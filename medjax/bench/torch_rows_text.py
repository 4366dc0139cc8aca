"""The language rows of `python -m medjax.bench vs-torch`: pathchat_stage1/2 (its Llama, transformers'
LlamaForCausalLM) and ptunifier (the PyTorch restatement of `PTUnifierTransformerSS`; Chen et al., ICCV
2023) (`medjax.bench.torch_rows` lists every row)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from medjax.bench.row_sides import RowSides, torch_with_threads
from medjax.bench.step_pair import jax_side, torch_side
from medjax.errors import MedjaxInputError

_WHERE = "medjax/bench/torch_rows_text.py"


# ---------------------------------------------------------------------------------------- PathChat's Llama

def pathchat_row(config, batch_size: int, sides: tuple[str, ...], seq_len: int = 256) -> RowSides:
    import jax.numpy as jnp
    import optax
    import transformers

    from medjax.convert import hf_llama

    torch = torch_with_threads()
    m = config.model
    vocab = int(m.vocab_size) or 32000  # 0 in the small variants: the tokenizer's; Llama 2's 32000 here
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=int(m.width), intermediate_size=int(m.mlp_dim),
        num_hidden_layers=int(m.depth), num_attention_heads=int(m.num_heads),
        num_key_value_heads=int(m.num_kv_heads) or int(m.num_heads), max_position_embeddings=max(seq_len, 4096),
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(int(config.seed))
    net = transformers.LlamaForCausalLM(hf_config).float()
    tokens = np.random.default_rng(0).integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int64)
    built = {}
    if "medjax" in sides:
        with tempfile.TemporaryDirectory() as directory:
            net.save_pretrained(directory, safe_serialization=True)
            model, variables, _ = hf_llama.load_with_report(directory)
        model = model.clone(remat=m.get("remat", "none")) if "remat" in m else model
        batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}

        def loss_fn(params, batch):
            logits = model.apply({"params": params}, batch["inputs"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        built["medjax"] = jax_side(loss_fn, lambda p, b: model.apply({"params": p}, b["inputs"]),
                                   variables["params"], batch)
    if "torch" in sides:
        x, y = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])

        def loss_torch(module):
            logits = module(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

        built["torch"] = torch_side(net, loss_torch, lambda module: module(input_ids=x).logits.numpy())
    shapes = (f"batch {batch_size} x {seq_len} tokens, Llama {m.width}x{m.depth}, {m.num_heads} heads, "
              f"MLP {m.mlp_dim}, vocab {vocab}")
    return RowSides(built, shapes, "same random weights (transformers save_pretrained -> medjax.convert.hf_llama)")


# ---------------------------------------------------------------------------------------- PTUnifier

def _ptunifier_dims(m, vocab: int):
    """The restatement's `Dims` at the experiment's `model` shapes (it has one width and one head count)."""
    from medjax.convert.torch_ptunifier import Dims

    widths = {int(m.vision_width), int(m.text_width), int(m.hidden_size)}
    heads = {int(m.vision_heads), int(m.text_heads), int(m.fusion_heads)}
    if len(widths) > 1 or len(heads) > 1 or int(m.text_mlp_dim) != int(m.fusion_mlp_dim):
        raise MedjaxInputError(
            f"{_WHERE}: model.vision_width/text_width/hidden_size={sorted(widths)}, the three heads={sorted(heads)}, "
            f"text_mlp_dim={m.text_mlp_dim} / fusion_mlp_dim={m.fusion_mlp_dim}: the PyTorch restatement "
            "(medjax.convert.torch_ptunifier) needs one width, one head count and one text/fusion MLP width")
    return Dims(width=widths.pop(), heads=heads.pop(), mlp=int(m.text_mlp_dim), vocab=vocab, pool=int(m.pool_size),
                visual_prompts=int(m.num_visual_prompts), textual_prompts=int(m.num_textual_prompts),
                patch=int(m.patch_size), image=int(m.image_size), clip_layers=int(m.vision_depth) + 1,
                text_layers=int(m.text_depth), fusion=int(m.fusion_layers), text_positions=int(m.max_positions),
                clip_mlp=int(m.vision_mlp_dim), attn_implementation="sdpa")


def ptunifier_row(config, batch_size: int, sides: tuple[str, ...]) -> RowSides:
    """PTUnifier (Chen et al., ICCV 2023) on the image + text path: MLM cross-entropy on every text position and
    ITM cross-entropy on the joint features (random targets), against the PyTorch restatement of the released
    `PTUnifierTransformerSS` (`medjax.convert.torch_ptunifier`, HF RoBERTa / BERT layers with SDPA attention),
    the weights through `medjax.convert.ptunifier` (a Lightning checkpoint file). Dropout on in both steps
    (model.dropout: HF's 0.1 on the torch side). Outputs compared: the MLM logits (eval mode)."""
    import jax
    import jax.numpy as jnp
    import optax

    from medjax.convert import ptunifier as convert_ptunifier
    from medjax.convert.torch_ptunifier import TorchPTUnifier

    torch = torch_with_threads()
    m = config.model
    vocab = int(m.vocab_size) or 50265  # 0 in the small variants: the tokenizer's; RoBERTa's 50265 here
    dims = _ptunifier_dims(m, vocab)
    length = int(config.data.max_length)
    torch.manual_seed(int(config.seed))
    net = TorchPTUnifier(dims)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, dims.image, dims.image), dtype=np.float32)
    ids = rng.integers(5, vocab, size=(batch_size, length))
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    mask = np.ones_like(ids)
    mlm_targets = rng.integers(0, vocab, size=(batch_size, length))
    itm_targets = rng.integers(0, 2, size=(batch_size,))
    built = {}
    if "medjax" in sides:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "ptunifier.ckpt")
            torch.save({"state_dict": net.state_dict()}, path)
            model, variables, _ = convert_ptunifier.load_with_report(
                path, vision_heads=dims.heads, text_heads=dims.heads, fusion_heads=dims.heads,
                num_visual_prompts=dims.visual_prompts, num_textual_prompts=dims.textual_prompts,
                dropout=float(m.dropout), scan=m.get("scan", False))
        batch = {"images": jnp.asarray(images.transpose(0, 2, 3, 1)), "ids": jnp.asarray(ids, jnp.int32),
                 "mask": jnp.asarray(mask, jnp.int32), "mlm": jnp.asarray(mlm_targets, jnp.int32),
                 "itm": jnp.asarray(itm_targets, jnp.int32)}

        def heads(module, images, ids, mask, train):
            out = module.infer(images, ids, mask, train=train)
            return module.mlm_logits(out["text_feats"]), module.itm_logits(out["cls_feats"])

        def loss_fn(params, batch):
            mlm, itm = model.apply({"params": params}, batch["images"], batch["ids"], batch["mask"], True,
                                   method=heads, rngs={"dropout": jax.random.key(0)})
            return (optax.softmax_cross_entropy_with_integer_labels(mlm, batch["mlm"]).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(itm, batch["itm"]).mean())

        def forward_fn(params, batch):
            return model.apply({"params": params}, batch["images"], batch["ids"], batch["mask"], False, method=heads)[0]

        built["medjax"] = jax_side(loss_fn, forward_fn, variables["params"], batch)
    if "torch" in sides:
        x, t, a = torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask)
        y_mlm, y_itm = torch.from_numpy(mlm_targets), torch.from_numpy(itm_targets)

        def loss_torch(module):
            text, _, cls = module.infer(x, t, a)
            cross_entropy = torch.nn.functional.cross_entropy
            return (cross_entropy(module.mlm_head(text).reshape(-1, vocab), y_mlm.reshape(-1))
                    + cross_entropy(module.itm_head.fc(cls), y_itm))

        built["torch"] = torch_side(net, loss_torch, lambda module: module.mlm_head(module.infer(x, t, a)[0]).numpy())
    shapes = (f"batch {batch_size} x ({dims.image}^2 image /{dims.patch}, {length} tokens), width {dims.width}, "
              f"CLIP {dims.clip_layers - 1} + RoBERTa {dims.text_layers} + {dims.fusion} co-attention layers, "
              f"vocab {vocab}; MLM + ITM")
    return RowSides(built, shapes, "same random weights (PyTorch restatement -> medjax.convert.ptunifier)")
