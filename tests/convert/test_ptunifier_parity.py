"""PTUnifier Lightning checkpoint -> Flax, pretraining model: the PyTorch restatement of the released
`PTUnifierTransformerSS` (medjax/convert/torch_ptunifier.py: the original's module names, so its state_dict has
the original's keys) at tiny size with random weights, saved as a Lightning-style {"state_dict": ...} file,
converted, and compared on all three input formats (image + text, image missing, text missing) and every
pretraining head within 1e-4; key problems reported by name; HF towers into scanned towers. The fine-tuned
heads: test_ptunifier_finetuned_parity.py."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax.linen import unbox

from medjax.convert import ptunifier as convert
from medjax.convert.torch_ptunifier import Dims, TorchPTUnifier

TOL = 1e-4
D = Dims()
W, HEADS, MLP, VOCAB, POOL, KV, KT = D.width, D.heads, D.mlp, D.vocab, D.pool, D.visual_prompts, D.textual_prompts
PATCH, IMAGE, CLIP_LAYERS, TEXT_LAYERS, FUSION = D.patch, D.image, D.clip_layers, D.text_layers, D.fusion


def flax_outputs(module, images, ids, mask):
    both = module.infer(images, ids, mask)
    text_only = module.infer_text_only(ids, mask)
    image_only = module.infer_image_only(images)
    itc = module.itc_features(image_only["cls_feats"], text_only["cls_feats"])
    return both, text_only, image_only, module.mlm_logits(both["text_feats"]), module.itm_logits(both["cls_feats"]), itc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchPTUnifier().eval()
    path = tmp_path_factory.mktemp("ptunifier") / "ptunifier.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "global_step": 100}, str(path))
    return model, str(path)


@pytest.mark.parametrize("scan", [False, True])
def test_converted_checkpoint_matches_the_torch_restatement(checkpoint, scan):
    torch_model, path = checkpoint
    model, variables, report = convert.load_with_report(path, vision_heads=HEADS, text_heads=HEADS,
                                                        fusion_heads=HEADS, num_visual_prompts=KV,
                                                        num_textual_prompts=KT, scan=scan)
    assert (model.vision_depth, model.text_depth, model.fusion_layers, model.pool_size) == (CLIP_LAYERS - 1, 2, 2, POOL)
    for tower, depth, mlp in (("vision", CLIP_LAYERS - 1, 4 * W), ("text", TEXT_LAYERS, MLP)):
        layers = variables["params"][tower]
        if scan:  # one stack per tower, the layer on axis 0
            assert "layers_0" not in layers and layers["layers"]["fc1"]["kernel"].shape == (depth, W, mlp)
        else:
            assert "layers" not in layers and layers[f"layers_{depth - 1}"]["fc1"]["kernel"].shape == (W, mlp)
    assert model.roberta_positions and model.image_size == IMAGE and model.vocab_size == VOCAB
    assert "language_encoder.pooler.dense.weight" in report.ignored
    assert "vision_encoder.ln_final.weight" in report.ignored
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = rng.integers(5, VOCAB, size=(3, 9))
    ids[:, 0], mask = 0, np.ones_like(ids)
    ids[0, 8], ids[1, 5], ids[1, 6:], mask[1, 6:] = 2, 2, 1, 0  # </s>, padding
    ids[2, 8] = 2
    timg, tids, tmask = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids), torch.from_numpy(mask)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), atol=TOL, rtol=0)  # noqa: E731
    if scan:  # the scanned towers on the image + text path (the other paths run the same towers: unrolled case)
        both = jax.device_get(jax.jit(lambda v: model.apply(v, images, ids, mask, method=model.infer))(variables))
        with torch.no_grad():
            for got, want in zip((both["text_feats"], both["image_feats"], both["cls_feats"]),
                                 torch_model.infer(timg, tids, tmask), strict=True):
                close(got, want)
        return
    ours = jax.jit(lambda v, i, t, m: model.apply(v, i, t, m, method=flax_outputs))(variables, images, ids, mask)
    both, text_only, image_only, mlm, itm, (itc_image, itc_text) = jax.device_get(ours)
    with torch.no_grad():
        for flax_out, kwargs in ((both, {}), (text_only, dict(pseudo_vision=True)),
                                 (image_only, dict(pseudo_language=True))):
            x, y, cls = torch_model.infer(timg, tids, tmask, **kwargs)
            close(flax_out["text_feats"], x)
            close(flax_out["image_feats"], y)
            close(flax_out["cls_feats"], cls)
        x, _, cls = torch_model.infer(timg, tids, tmask)
        close(mlm, torch_model.mlm_head(x))
        close(itm, torch_model.itm_head.fc(cls))
        head = torch_model.itc_head
        image_only_cls = torch_model.infer(timg, tids, tmask, pseudo_language=True)[2]
        text_only_cls = torch_model.infer(timg, tids, tmask, pseudo_vision=True)[2]
        close(itc_image, head.vision_proj(head.vision_ln(image_only_cls)))
        close(itc_text, head.language_proj(head.language_ln(text_only_cls)))
    assert text_only["image_feats"].shape == (3, 1 + KV, W) and image_only["text_feats"].shape == (3, 2 + KT, W)


def test_key_problems_are_reported_by_name(checkpoint):
    torch_model, _ = checkpoint
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    fields = convert.config_from_state_dict(state, "x")
    model = convert.PTUnifier(**{**convert.PTUNIFIER_FULL, **fields, "vision_heads": HEADS, "text_heads": HEADS,
                                 "fusion_heads": HEADS, "num_visual_prompts": KV, "num_textual_prompts": KT})
    broken = dict(state)
    del broken["multi_modal_vision_layers.1.crossattention.self.key.weight"]
    broken["itm_head.extra"] = np.zeros(2, np.float32)
    broken["mlm_head.bias"] = np.zeros(VOCAB + 1, np.float32)
    with pytest.raises(ValueError) as error:
        convert.convert_state_dict(broken, model, "broken.ckpt")
    message = str(error.value)
    assert "broken.ckpt" in message
    assert "missing (1): multi_modal_vision_layers.1.crossattention.self.key.weight" in message
    assert "unexpected (1): itm_head.extra" in message
    assert f"mlm_head.bias has shape ({VOCAB + 1},), expected ({VOCAB},)" in message


def test_hf_towers_fill_a_scanned_ptunifier_layer_by_layer(tmp_path):
    """init_towers_from_hf into scanned towers: the same values as into unrolled ones, stacked on axis 0;
    the HF CLIP's extra 3rd layer (the tower keeps 2) is skipped."""
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=W, intermediate_size=MLP, num_hidden_layers=CLIP_LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=W, intermediate_size=MLP, num_hidden_layers=TEXT_LAYERS, num_attention_heads=HEADS,
        vocab_size=VOCAB, max_position_embeddings=20, type_vocab_size=1))
    clip.save_pretrained(str(tmp_path / "clip"))
    roberta.save_pretrained(str(tmp_path / "roberta"))
    fields = dict(convert.PTUNIFIER_FULL, image_size=IMAGE, patch_size=PATCH, vision_width=W,
                  vision_depth=CLIP_LAYERS - 1, vision_heads=HEADS, vision_mlp_dim=MLP, vocab_size=VOCAB, text_width=W,
                  text_depth=TEXT_LAYERS, text_heads=HEADS, text_mlp_dim=MLP, max_positions=20, hidden_size=W,
                  fusion_layers=1, fusion_heads=HEADS, fusion_mlp_dim=MLP, pool_size=POOL, num_visual_prompts=KV,
                  num_textual_prompts=KT)
    images, ids = np.zeros((2, IMAGE, IMAGE, 3), np.float32), np.ones((2, 4), np.int32)
    filled = {}
    for scan in (False, True):
        model = convert.PTUnifier(**fields, scan=scan)
        shapes = unbox(jax.eval_shape(model.init, jax.random.key(0), images, ids, ids)["params"])  # no compile
        params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        filled[scan], notes = convert.init_towers_from_hf(params, vision=str(tmp_path / "clip"),
                                                          text=str(tmp_path / "roberta"))
        assert any(f"layers_{CLIP_LAYERS - 1}" in note for note in notes)
    for tower, depth in (("vision", CLIP_LAYERS - 1), ("text", TEXT_LAYERS)):
        stacked, unrolled = filled[True][tower], filled[False][tower]
        assert sorted(stacked) == sorted([k for k in unrolled if not k.startswith("layers_")] + ["layers"])
        for i in range(depth):
            for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], stacked["layers"])),
                                 jax.tree.leaves(unrolled[f"layers_{i}"]), strict=True):
                np.testing.assert_array_equal(got, want)
    word = roberta.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(filled[True]["text"]["word_embeddings"]["embedding"], word)
