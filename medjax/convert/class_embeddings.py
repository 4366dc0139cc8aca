"""The Universal Model's class text embeddings (the original's `pretrained_weights/clip_embedding.py`):
the CLIP text features of its 32 class prompts, from a local Hugging Face CLIP directory.

    python -m medjax.convert embed-classes --clip CLIP_DIR --out class_embeddings.npy
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.universal import class_prompts


def embed_class_prompts(clip_dir: str, prompts: list[str] | None = None) -> np.ndarray:
    """float32 (len(prompts), projection_dim) CLIP text features (`get_text_features`: the projected EOT
    state, not normalised) of `prompts` (default: `class_prompts()`), from a local Hugging Face CLIP
    directory (`clip` or `clip_text_model` with a text projection) and the tokenizer saved in it."""
    from transformers import AutoTokenizer

    from medjax.convert import hf

    prompts = class_prompts() if prompts is None else list(prompts)
    model_type = hf.read_config(clip_dir).get("model_type")
    model, variables = hf.load(clip_dir, tower="text" if model_type == "clip" else None)
    if model.projection_dim is None:
        raise ValueError(f"{clip_dir}: the CLIP text tower has no text_projection weights; class embeddings are "
                         "the projected text features (CLIPModel or CLIPTextModelWithProjection)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{clip_dir}: no usable tokenizer files (tokenizer.json or vocab.json + merges.txt): "
                         f"{error}") from error
    # Causal attention: padding after the EOT token cannot change its state, so pad to the longest.
    tokens = tokenizer(prompts, padding=True, return_tensors="np")
    if tokens["input_ids"].shape[1] > model.max_length:
        raise ValueError(f"{clip_dir}: a prompt has {tokens['input_ids'].shape[1]} tokens, more than the "
                         f"model's {model.max_length} positions")
    embed = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=model.text_embeds))
    features = embed(variables, jnp.asarray(tokens["input_ids"], jnp.int32),
                     jnp.asarray(tokens["attention_mask"], jnp.int32))
    return np.asarray(jax.device_get(features), dtype=np.float32)
