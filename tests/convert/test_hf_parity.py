"""Hugging Face -> Flax conversion: randomly initialised transformers models (tiny configs, saved to
tmp_path as safetensors or pytorch_model.bin) against `medjax.convert.hf.load`, fp32 within 1e-4."""
import json
import os

import jax
import numpy as np
import pytest
import torch  # the torch test extra (torch==2.13.0, CPU build): the reference implementation
import transformers
from safetensors.numpy import load_file, save_file

from medjax.convert import hf
from medjax.convert.torch_io import read_state_dict

TOL = 1e-4
TINY_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
TINY_BERT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=40,
                 max_position_embeddings=24)


def save_hf(model, directory, *, torch_bin=False):
    """save_pretrained (safetensors), or the legacy layout: config.json + torch.save'd pytorch_model.bin."""
    if torch_bin:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    else:
        model.save_pretrained(directory)
    return str(directory)


def seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


def close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=TOL, rtol=0)


def run(model, variables, *args, method):
    """model.apply under jit: one compile instead of one per eager op."""
    return jax.jit(lambda variables, *args: model.apply(variables, *args, method=method))(variables, *args)


def vision_outputs(model, pixels):
    """(last_hidden_state, pooled_output[, image_embeds]) from one forward pass."""
    last = model(pixels)
    pooled = model.pool(last)
    return (last, pooled) if model.projection_dim is None else (last, pooled, model.project(pooled))


def text_outputs(model, input_ids, attention_mask):
    """(last_hidden_state, pooled_output[, text_embeds]) from one forward pass."""
    last = model(input_ids, attention_mask)
    pooled = model.pool(input_ids, last)
    return (last, pooled) if model.projection_dim is None else (last, pooled, model.project(pooled))


def bert_outputs(model, input_ids, attention_mask, token_type_ids=None):
    last = model(input_ids, attention_mask, token_type_ids)
    return last, model.pool(last)


def padded_ids(rng, vocab, lengths, total, pad, low=3):
    ids = rng.integers(low, vocab - 1, size=(len(lengths), total))
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad), mask


def test_clip_vision_with_projection_matches_hf_including_resized_positions(tmp_path):
    config = transformers.CLIPVisionConfig(**TINY_CLIP, image_size=32, patch_size=8, projection_dim=16)
    ref = seeded(transformers.CLIPVisionModelWithProjection, config)
    model, variables = hf.load(save_hf(ref, tmp_path))
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        inner = ref.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        out = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    last, pooled, embeds = run(model, variables, pixels, method=vision_outputs)
    close(last, out.last_hidden_state)
    close(pooled, inner.pooler_output)
    close(embeds, out.image_embeds)
    # Another, non-square size: bicubic position-embedding resize == HF interpolate_pos_encoding.
    other = np.random.default_rng(1).normal(size=(1, 48, 40, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(other.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
    resized = run(model, variables, other, method=model.__call__)
    assert resized.shape == (1, 1 + 6 * 5, 32)
    close(resized, out.last_hidden_state)


def test_clip_vision_model_from_pytorch_model_bin(tmp_path):
    config = transformers.CLIPVisionConfig(**TINY_CLIP, image_size=16, patch_size=4, hidden_act="gelu")
    ref = seeded(transformers.CLIPVisionModel, config, seed=1)
    directory = save_hf(ref, tmp_path, torch_bin=True)
    assert sorted(os.listdir(directory)) == ["config.json", "pytorch_model.bin"]
    model, variables = hf.load(directory)
    assert model.projection_dim is None and model.hidden_act == "gelu"
    pixels = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    last, pooled = run(model, variables, pixels, method=vision_outputs)
    close(last, out.last_hidden_state)
    close(pooled, out.pooler_output)


@pytest.mark.parametrize("eos_token_id", [2, 37])  # legacy rule (argmax of ids) and first-EOS rule
def test_clip_text_with_projection_matches_hf_with_padding(tmp_path, eos_token_id):
    config = transformers.CLIPTextConfig(**TINY_CLIP, vocab_size=40, max_position_embeddings=12, projection_dim=8,
                                         eos_token_id=eos_token_id, pad_token_id=1, bos_token_id=0)
    ref = seeded(transformers.CLIPTextModelWithProjection, config, seed=2)
    model, variables = hf.load(save_hf(ref, tmp_path))
    assert model.eos_token_id == eos_token_id
    ids, mask = padded_ids(np.random.default_rng(3), 37, [5, 9, 3], 10, pad=1)
    ids[0, 4], ids[1, 8], ids[2, 2] = 39, 39, 39  # CLIP's EOT has the largest id
    ids[:, 0] = 0
    if eos_token_id == 37:  # put the EOS token where the two rules disagree
        ids[0, 2], ids[1, 6] = 37, 37
        ids[2, 3:] = 37  # pad == eos: the first EOS is pooled
    with torch.no_grad():
        inner = ref.text_model(torch.from_numpy(ids), torch.from_numpy(mask))
        out = ref(torch.from_numpy(ids), torch.from_numpy(mask))
    last, pooled, embeds = run(model, variables, ids, mask, method=text_outputs)
    close(last, out.last_hidden_state)
    close(pooled, inner.pooler_output)
    close(embeds, out.text_embeds)


def test_clip_text_model_without_projection(tmp_path):
    config = transformers.CLIPTextConfig(**TINY_CLIP, vocab_size=40, max_position_embeddings=8, eos_token_id=39,
                                         pad_token_id=1, bos_token_id=0)
    ref = seeded(transformers.CLIPTextModel, config, seed=3)
    model, variables = hf.load(save_hf(ref, tmp_path))
    assert model.projection_dim is None
    ids, mask = padded_ids(np.random.default_rng(4), 39, [6, 4], 8, pad=1)
    ids[0, 5], ids[1, 3] = 39, 39
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), torch.from_numpy(mask))
    last, pooled = run(model, variables, ids, mask, method=text_outputs)
    close(last, out.last_hidden_state)
    close(pooled, out.pooler_output)
    with pytest.raises(ValueError, match="no text projection"):
        jax.eval_shape(lambda v: model.apply(v, ids, mask, method=model.text_embeds), variables)


def test_full_clip_directory_needs_a_tower_and_gives_both_features(tmp_path):
    config = transformers.CLIPConfig(
        text_config=dict(TINY_CLIP, vocab_size=40, max_position_embeddings=8, eos_token_id=39),
        vision_config=dict(TINY_CLIP, hidden_size=24, image_size=16, patch_size=8), projection_dim=8)
    ref = seeded(transformers.CLIPModel, config, seed=4)
    directory = save_hf(ref, tmp_path)
    with pytest.raises(ValueError, match=r"config\.json.*tower=.*'vision', 'text'"):
        hf.load(directory)
    pixels = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype(np.float32)
    ids, mask = padded_ids(np.random.default_rng(6), 39, [7, 5], 8, pad=1)
    ids[0, 6], ids[1, 4] = 39, 39
    with torch.no_grad():
        image = ref.get_image_features(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
        text = ref.get_text_features(torch.from_numpy(ids), torch.from_numpy(mask)).pooler_output
    vision, vision_vars, report = hf.load_with_report(directory, tower="vision")
    close(run(vision, vision_vars, pixels, method=vision.image_embeds), image)
    assert "logit_scale" in report.ignored and "text_projection.weight" in report.ignored
    assert not any(key.startswith("vision_model.") for key in report.ignored)
    text_model, text_vars = hf.load(directory, tower="text")
    close(run(text_model, text_vars, ids, mask, method=text_model.text_embeds), text)


def test_bert_matches_hf_with_token_types_and_padding(tmp_path):
    ref = seeded(transformers.BertModel, transformers.BertConfig(**TINY_BERT, hidden_act="gelu"), seed=5)
    model, variables = hf.load(save_hf(ref, tmp_path))
    ids, mask = padded_ids(np.random.default_rng(7), 40, [9, 5, 12], 12, pad=0)
    types = (np.arange(12)[None] >= np.array([[4], [2], [7]])).astype(np.int64) * mask
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))
    last, pooled = run(model, variables, ids, mask, types, method=bert_outputs)
    close(last, out.last_hidden_state)
    close(pooled, out.pooler_output)


def test_roberta_matches_hf_with_padding_positions(tmp_path):
    ref = seeded(transformers.RobertaModel, transformers.RobertaConfig(**TINY_BERT, type_vocab_size=1), seed=6)
    model, variables = hf.load(save_hf(ref, tmp_path))
    assert model.position_padding_idx == 1
    ids, mask = padded_ids(np.random.default_rng(8), 40, [10, 4], 12, pad=1)
    ids[:, 0] = 0
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), torch.from_numpy(mask))
    last, pooled = run(model, variables, ids, mask, method=bert_outputs)
    close(last, out.last_hidden_state)
    close(pooled, out.pooler_output)


def test_scanned_roberta_gets_stacked_layers_and_matches_hf(tmp_path):
    """scan=True: the checkpoint's layer.{i} tensors land in one `layers` stack (leading layer axis), the
    unrolled conversion's layers_{i} row by row, and the outputs still match transformers."""
    ref = seeded(transformers.RobertaModel, transformers.RobertaConfig(**TINY_BERT, type_vocab_size=1), seed=6)
    directory = save_hf(ref, tmp_path)
    model, variables = hf.load(directory, scan=True)
    unrolled_model, unrolled = hf.load(directory)
    assert model.scan is True and unrolled_model.scan is False
    params, flat = variables["params"], unrolled["params"]
    assert "layers" in params and not any(k.startswith("layers_") for k in params)
    assert sorted(params) == sorted([k for k in flat if not k.startswith("layers_")] + ["layers"])
    for i in range(2):
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], params["layers"])),
                             jax.tree.leaves(flat[f"layers_{i}"]), strict=True):
            np.testing.assert_array_equal(got, want)
    kernel = params["layers"]["attention"]["query"]["kernel"]
    assert kernel.shape == (2,) + flat["layers_0"]["attention"]["query"]["kernel"].shape
    ids, mask = padded_ids(np.random.default_rng(8), 40, [10, 4], 12, pad=1)
    ids[:, 0] = 0
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), torch.from_numpy(mask))
    last, pooled = run(model, variables, ids, mask, method=bert_outputs)
    close(last, out.last_hidden_state)
    close(pooled, out.pooler_output)
    _, auto = hf.load(directory, scan=None)  # auto: 2 layers (< SCAN_MIN_DEPTH) stay unrolled
    assert "layers_0" in auto["params"] and "layers" not in auto["params"]


def test_legacy_bert_for_masked_lm_bin_uses_the_encoder_and_ignores_heads(tmp_path):
    """A `bert.`-prefixed BertForMaskedLM pytorch_model.bin with TF-era `LayerNorm.gamma/beta` names."""
    ref = seeded(transformers.BertForMaskedLM, transformers.BertConfig(**TINY_BERT), seed=7)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(24)[None]
    ref.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, variables, report = hf.load_with_report(str(tmp_path))
    assert not model.add_pooling_layer  # BertForMaskedLM has no pooler
    assert "bert.embeddings.position_ids" in report.ignored
    assert any(key.startswith("cls.predictions") for key in report.ignored)
    ids, mask = padded_ids(np.random.default_rng(9), 40, [8, 3], 8, pad=0)
    with torch.no_grad():
        out = ref.bert(torch.from_numpy(ids), torch.from_numpy(mask))
    close(run(model, variables, ids, mask, method=model.__call__), out.last_hidden_state)


def test_every_missing_unexpected_and_misshapen_key_is_named(tmp_path):
    ref = seeded(transformers.BertModel, transformers.BertConfig(**TINY_BERT), seed=8)
    directory = save_hf(ref, tmp_path)
    file = os.path.join(directory, "model.safetensors")
    state = load_file(file)
    del state["encoder.layer.1.output.dense.bias"], state["embeddings.LayerNorm.weight"]
    state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((47, 32), np.float32)
    save_file(state, file)
    with pytest.raises(ValueError) as error:
        hf.load(directory)
    message = str(error.value)
    assert file in message
    for key in ("encoder.layer.1.output.dense.bias", "embeddings.LayerNorm.weight",
                "encoder.layer.0.attention.self.rotary.weight"):
        assert key in message
    assert "encoder.layer.0.intermediate.dense.weight has shape (47, 32), expected (48, 32)" in message


def test_config_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2'.*clip_vision_model, clip_text_model, clip, bert"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": "768"}))
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"config\.json: field 'hidden_size' must be int, got '768'"):
        hf.load(str(tmp_path))
    with pytest.raises(ValueError, match="tower='text' applies only to model_type 'clip'"):
        hf.load(str(tmp_path), tower="text")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path / "absent"))


def test_config_defaults_equal_transformers_defaults():
    pairs = [(hf.CLIP_VISION_DEFAULTS, transformers.CLIPVisionConfig()),
             (hf.CLIP_TEXT_DEFAULTS, transformers.CLIPTextConfig()),
             (hf.BERT_DEFAULTS, transformers.BertConfig()), (hf.ROBERTA_DEFAULTS, transformers.RobertaConfig()),
             (hf.CLIP_DEFAULTS, transformers.CLIPConfig())]
    for ours, theirs in pairs:
        assert {name: getattr(theirs, name) for name in ours} == ours


def test_bfloat16_safetensors_read_without_torch(tmp_path):
    from safetensors.torch import save_file as torch_save_file

    values = torch.randn(3, 5).to(torch.bfloat16)
    torch_save_file({"w": values, "b": torch.arange(4, dtype=torch.float16)}, str(tmp_path / "x.safetensors"))
    state = read_state_dict(str(tmp_path / "x.safetensors"))
    assert str(state["w"].dtype) == "bfloat16" and state["w"].shape == (3, 5)
    np.testing.assert_array_equal(state["w"].astype(np.float32), values.float().numpy())
    np.testing.assert_array_equal(state["b"], np.arange(4, dtype=np.float16))
