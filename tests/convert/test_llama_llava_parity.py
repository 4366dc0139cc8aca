"""Llama / LLaVA against transformers 5.23 (tiny random `LlamaForCausalLM` / `LlavaForConditionalGeneration`
saved as safetensors): `medjax.convert.hf.load` logits within 1e-4, cached decoding == the full forward, and
`medjax.generate.generate` == HF's greedy `generate` token for token."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from medjax.convert import hf, hf_llama
from medjax.convert.torch_io import read_state_dict
from medjax.generate import generate, top_p_filter
from medjax.nn.llama import default_position_ids

TOL = 1e-4
VOCAB, IMAGE_TOKEN = 64, 63
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
TINY_CLIP = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                 patch_size=14)


def seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    ref = seeded(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_LLAMA))
    directory = str(tmp_path_factory.mktemp("llama"))
    ref.save_pretrained(directory)
    return ref, directory


@pytest.fixture(scope="module")
def scanned(llama):
    """The converted Llama with its layers under one nn.scan, shared by the generation tests (one compile)."""
    return hf.load(llama[1], scan=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_CLIP),
                                      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_index=IMAGE_TOKEN)
    ref = seeded(transformers.LlavaForConditionalGeneration, config, seed=1)
    directory = str(tmp_path_factory.mktemp("llava"))
    ref.save_pretrained(directory)
    return ref, directory


def left_padded(seed, lengths, total):
    ids = np.random.default_rng(seed).integers(3, VOCAB - 2, size=(len(lengths), total))
    mask = (np.arange(total)[None] >= total - np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


@pytest.mark.parametrize("scan", [False, True])
def test_llama_logits_match_hf_with_left_padding(llama, scan):
    ref, directory = llama
    model, variables = hf.load(directory, scan=scan)
    assert (model.num_kv_heads, model.rope_theta, model.scanned) == (2, 500.0, scan)
    ids, mask = left_padded(0, [7, 4], 7)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, ids, mask))
    assert logits.dtype == np.float32 and logits.shape == (2, 7, VOCAB)
    np.testing.assert_allclose(logits[mask == 1], expected[mask == 1], atol=TOL, rtol=0)


def test_cached_decoding_equals_full_forward(scanned):
    model, variables = scanned
    ids, mask = left_padded(1, [9, 6], 9)
    full = model.apply(variables, ids, mask)
    prefix, total = 5, 12
    cache = model.init_cache(2, total)
    kv_mask = np.zeros((2, total), np.int32)
    kv_mask[:, :9] = mask
    positions = default_position_ids(jnp.asarray(mask))
    step = jax.jit(lambda v, ids, cache, i, pos: model.apply(v, ids, cache, i, kv_mask, pos, method=model.decode))
    logits, cache = step(variables, ids[:, :prefix], cache, 0, positions[:, :prefix])  # prefill 5 tokens
    chunks = [logits]
    for i in range(prefix, 9):  # then one token at a time
        logits, cache = step(variables, ids[:, i:i + 1], cache, i, positions[:, i:i + 1])
        chunks.append(logits)
    cached = np.concatenate([np.asarray(c) for c in chunks], axis=1)
    np.testing.assert_allclose(cached[mask == 1], np.asarray(full)[mask == 1], atol=1e-5, rtol=0)


def test_greedy_generate_matches_hf_including_eos_stop(llama, scanned):
    ref, _ = llama
    model, variables = scanned
    ids, mask = left_padded(2, [6, 3], 6)
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    out = np.asarray(generate(model, variables, ids, attention_mask=mask, max_new_tokens=8))
    assert out.dtype == np.int32 and out.shape == (2, 14)
    np.testing.assert_array_equal(out, expected)
    # An EOS that row 0 emits at its 3rd new token: that row continues with EOS; the batch stops when all
    # rows have stopped (rows 0 and 1 both stop once each emitted one of the two EOS ids).
    eos = [int(expected[0, 8]), int(expected[1, 9])]
    with torch.no_grad():
        stopped = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]).numpy()
    out = np.asarray(generate(model, variables, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos))
    assert out.shape[1] < 14
    np.testing.assert_array_equal(out, stopped)


def test_top_p_filter_matches_hf_warper():
    logits = np.random.default_rng(3).normal(size=(3, 20)).astype(np.float32) * 3
    for top_p in (0.3, 0.8):
        warped = transformers.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
        ours = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(warped))
        assert 0 < np.isfinite(ours).sum() < ours.size


def test_sampling_generation(scanned):
    model, variables = scanned
    ids, mask = left_padded(2, [6, 3], 6)  # the greedy test's shapes: its compiled program is reused
    greedy = np.asarray(generate(model, variables, ids, attention_mask=mask, max_new_tokens=8))
    sample = lambda **kw: np.asarray(generate(model, variables, ids, attention_mask=mask, max_new_tokens=8, **kw))  # noqa: E731
    np.testing.assert_array_equal(sample(temperature=0.7, top_p=1e-6), greedy)  # the nucleus is the argmax
    a, b = sample(temperature=1.5, rng=jax.random.key(1)), sample(temperature=1.5, rng=jax.random.key(1))
    c = sample(temperature=1.5, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a[:, :6] == ids).all()


def llava_inputs(seed, image_tokens):
    ids = np.random.default_rng(seed).integers(3, VOCAB - 2, size=(2, image_tokens + 6))
    ids[:, 1:1 + image_tokens] = IMAGE_TOKEN
    pixels = np.random.default_rng(seed + 1).normal(size=(2, 28, 28, 3)).astype(np.float32)
    return ids, pixels


def check_llava(ref, model, variables):
    ids, pixels = llava_inputs(5, model.num_image_tokens)
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids), pixel_values=torch_pixels).logits.numpy()
    logits = jax.jit(lambda v, i, p: model.apply(v, i, pixel_values=p))(variables, ids, pixels)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
    return ids, pixels, torch_pixels


def test_llava_logits_and_greedy_generation_match_hf(llava):
    ref, directory = llava
    model, variables, report = hf_llama.load_with_report(directory)
    assert model.num_image_tokens == 4 and model.vision_tower.depth == 2  # hidden_states[-2] of 3 layers
    assert any(key.startswith("vision_tower.encoder.layers.2.") for key in report.ignored)
    ids, pixels, torch_pixels = check_llava(ref, model, variables)
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.from_numpy(ids), pixel_values=torch_pixels, max_new_tokens=5,
                                do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    out = np.asarray(generate(model, variables, ids, pixel_values=pixels, max_new_tokens=5))
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="exactly 4 image tokens"):
        model.apply(variables, ids[:, 2:], pixel_values=pixels)


@pytest.mark.parametrize("layout", ["in_memory", "hub"])
def test_llava_other_key_layouts(llava, tmp_path, layout):
    ref, directory = llava
    if layout == "in_memory":  # transformers 5 module names: model.language_model.*, model.vision_tower.*, lm_head
        state = {k: v.numpy() for k, v in ref.state_dict().items()}
        assert any(k.startswith("model.language_model.") for k in state)
    else:  # transformers 4 hub files: language_model.model.*, vision_tower.vision_model.*
        state = {k.replace("vision_tower.", "vision_tower.vision_model."): v
                 for k, v in read_state_dict(directory).items()}
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as src, open(os.path.join(tmp_path, "config.json"), "w") as dst:
        dst.write(src.read())
    model, variables = hf.load(str(tmp_path))
    check_llava(ref, model, variables)


def test_unsupported_config_is_named(llama, tmp_path):
    _, directory = llama
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with open(os.path.join(tmp_path, "config.json"), "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match=r"config.json: field 'rope_parameters.rope_type' is 'llama3'"):
        hf.load(str(tmp_path))


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_loads_with_the_qk_permutation(llama, tmp_path, shards):
    """Meta's original release (params.json + consolidated.NN shards, q/k rows in the interleaved rotary layout,
    model-parallel splits) loads to the same logits as the HF checkpoint it is converted from."""
    ref, directory = llama
    hf_state = read_state_dict(directory)
    heads, kv_heads, width = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["hidden_size"]

    def to_meta(weight, n):  # the inverse of hf_llama.meta_to_rotate_half
        rows, cols = weight.shape
        return weight.reshape(n, 2, rows // n // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)

    names = {"embed_tokens": "tok_embeddings", "norm": "norm", "self_attn.q_proj": "attention.wq",
             "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    meta = {}
    for key, value in hf_state.items():
        key = key.removeprefix("model.").removesuffix(".weight")
        if key == "lm_head":
            key = "output"
        for hf_name, meta_name in names.items():
            key = key.replace(hf_name, meta_name)
        if key.endswith("wq"):
            value = to_meta(value, heads)
        elif key.endswith("wk"):
            value = to_meta(value, kv_heads)
        meta[key + ".weight"] = np.ascontiguousarray(value)
    for i in range(shards):
        part = {}
        for key, value in meta.items():
            dim = split.get(key.removesuffix(".weight").split(".")[-1])
            part[key] = value if dim is None else np.ascontiguousarray(np.split(value, shards, axis=dim)[i])
        save_file(part, os.path.join(tmp_path, f"consolidated.{i:02d}.safetensors"))
    with open(os.path.join(tmp_path, "params.json"), "w") as handle:
        json.dump({"dim": width, "n_layers": TINY_LLAMA["num_hidden_layers"], "n_heads": heads, "n_kv_heads": kv_heads,
                   "vocab_size": -1, "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 500.0}, handle)
    model, variables = hf.load(str(tmp_path))
    assert (model.vocab_size, model.num_kv_heads, model.mlp_dim, model.tie_embeddings) == (VOCAB, 2, 48, False)
    ids, mask = left_padded(1, [6, 6], 6)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, ids, mask)), expected, atol=TOL, rtol=0)
