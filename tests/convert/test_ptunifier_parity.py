"""PTUnifier Lightning checkpoint -> Flax: a PyTorch restatement of the released `PTUnifierTransformerSS`
(same module names, so its state_dict has the original's keys: OpenAI CLIP `VisualTransformer` with 11 of
12 blocks kept as METER does, HF RobertaModel, METER `BertCrossLayer` built from HF BertAttention /
BertIntermediate / BertOutput, the heads and the two prompt pools) at tiny size with random weights,
saved as a Lightning-style {"state_dict": ...} file, converted, and compared on all three input formats
(image + text, image missing, text missing) and every head within 1e-4."""
from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.linen import unbox
from torch import nn
from transformers.models.bert import modeling_bert as hf_bert

from medjax.convert import ptunifier as convert

TOL = 1e-4
W, HEADS, MLP, VOCAB, POOL, KV, KT = 32, 4, 48, 50, 12, 5, 4  # width, heads, FFN, vocab, pool, prompts (v, t)
PATCH, IMAGE, CLIP_LAYERS, TEXT_LAYERS, FUSION = 8, 32, 3, 2, 2


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):  # OpenAI CLIP
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(W, HEADS)
        self.ln_1, self.ln_2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(W, 4 * W)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * W, W))]))

    def forward(self, x):  # (L, N, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock() for _ in range(layers - 1)])  # METER: layers - 1


class VisualTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, W, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(W) * W ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((IMAGE // PATCH) ** 2 + 1, W) * W ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(W), nn.LayerNorm(W)
        self.transformer = Transformer(CLIP_LAYERS)

    def embed(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, W)
        return torch.cat([cls, x], 1) + self.positional_embedding

    def trans(self, x):
        x = self.transformer.resblocks(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)


class CLIP(nn.Module):  # METER's CLIP keeps the text side's embeddings and final LN (unused)
    def __init__(self):
        super().__init__()
        self.visual = VisualTransformer()
        self.token_embedding = nn.Embedding(20, W)
        self.positional_embedding = nn.Parameter(torch.randn(7, W))
        self.ln_final = nn.LayerNorm(W)


class BertCrossLayer(nn.Module):  # METER: self-attention, cross-attention, FFN
    def __init__(self, config):
        super().__init__()
        self.attention = hf_bert.BertAttention(config)
        self.crossattention = hf_bert.BertAttention(config, is_cross_attention=True)
        self.intermediate = hf_bert.BertIntermediate(config)
        self.output = hf_bert.BertOutput(config)

    def forward(self, x, y, x_mask, y_mask):
        a = self.attention(x, x_mask)[0]
        c = self.crossattention(a, encoder_hidden_states=y, encoder_attention_mask=y_mask)[0]
        return self.output(self.intermediate(c), c)


class Pooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(W, W)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class MLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = hf_bert.BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(W, VOCAB, bias=False)
        self.bias = nn.Parameter(torch.randn(VOCAB) * 0.1)

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class ITMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * W, 2)


class ITCHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_ln, self.language_ln = nn.LayerNorm(2 * W), nn.LayerNorm(2 * W)
        self.vision_proj, self.language_proj = nn.Linear(2 * W, W, bias=False), nn.Linear(2 * W, W, bias=False)


def extended(mask):
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class TorchPTUnifier(nn.Module):
    """The released module's attributes and `infer` (eval mode), restated."""

    def __init__(self):
        super().__init__()
        config = dict(hidden_size=W, num_attention_heads=HEADS, intermediate_size=MLP, vocab_size=VOCAB,
                      layer_norm_eps=1e-5, attn_implementation="eager")
        cross = transformers.BertConfig(**config, max_position_embeddings=20)
        self.vision_encoder = CLIP()
        self.language_encoder = transformers.RobertaModel(transformers.RobertaConfig(
            **config, num_hidden_layers=TEXT_LAYERS, max_position_embeddings=24, type_vocab_size=1, pad_token_id=1))
        self.multi_modal_language_proj, self.multi_modal_vision_proj = nn.Linear(W, W), nn.Linear(W, W)
        self.modality_type_embeddings = nn.Embedding(2, W)
        self.multi_modal_vision_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(FUSION)])
        self.multi_modal_language_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(FUSION)])
        self.multi_modal_vision_pooler, self.multi_modal_language_pooler = Pooler(), Pooler()
        self.mlm_head, self.itm_head, self.itc_head = MLMHead(cross), ITMHead(), ITCHead()
        self.pseudo_vision_token_pool = nn.Parameter(torch.randn(POOL, W))
        self.pseudo_language_token_pool = nn.Parameter(torch.randn(POOL, W))
        for p in self.parameters():  # LayerNorm / bias defaults are 1 / 0: randomise everything
            p.data.add_(torch.randn_like(p) * 0.1)

    @staticmethod
    def find(query, pool, k):
        return pool[(query @ pool.T).topk(k, -1)[1]]

    def infer(self, img, ids, mask, pseudo_vision=False, pseudo_language=False):
        embeddings, visual = self.language_encoder.embeddings, self.vision_encoder.visual
        if pseudo_vision:
            text = embeddings(input_ids=ids)
            query = (text[:, 1:] * mask[:, 1:, None]).sum(1) / (mask[:, 1:].sum(1, keepdims=True) + 1e-8)
            cls = (visual.class_embedding + visual.positional_embedding[:1]).expand(len(ids), 1, W)
            image = torch.cat([cls, self.find(query, self.pseudo_vision_token_pool, KV)], 1)
        elif pseudo_language:
            image = visual.embed(img)
            prompts = self.find(image[:, 1:].mean(1), self.pseudo_language_token_pool, KT)
            special = lambda t: embeddings(input_ids=torch.full((len(img), 1), t, dtype=torch.long))  # noqa: E731
            text = torch.cat([special(0), prompts, special(2)], 1)
            mask = torch.ones(text.shape[:2], dtype=torch.long)
        else:
            text, image = embeddings(input_ids=ids), visual.embed(img)
        for layer in self.language_encoder.encoder.layer:
            text = layer(text, extended(mask))
            text = text[0] if isinstance(text, tuple) else text
        x = self.multi_modal_language_proj(text) + self.modality_type_embeddings(torch.zeros_like(mask))
        image = self.multi_modal_vision_proj(visual.trans(image))
        image_mask = torch.ones(image.shape[:2], dtype=torch.long)
        y = image + self.modality_type_embeddings(torch.ones_like(image_mask))
        for text_layer, image_layer in zip(self.multi_modal_language_layers, self.multi_modal_vision_layers):
            x, y = (text_layer(x, y, extended(mask), extended(image_mask)),
                    image_layer(y, x, extended(image_mask), extended(mask)))
        cls = torch.cat([self.multi_modal_language_pooler(x), self.multi_modal_vision_pooler(y)], -1)
        return x, y, cls


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
    ours = jax.jit(lambda v, i, t, m: model.apply(v, i, t, m, method=flax_outputs))(variables, images, ids, mask)
    both, text_only, image_only, mlm, itm, (itc_image, itc_text) = jax.device_get(ours)
    timg, tids, tmask = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids), torch.from_numpy(mask)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), atol=TOL, rtol=0)  # noqa: E731
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
        params = jax.device_get(unbox(jax.jit(model.init)(jax.random.key(0), images, ids, ids)["params"]))
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


# ---- fine-tuned checkpoints: vqa_head / cls_head / mlc_head, irtr_head, clm_proj + clm_head ----------------

ANSWERS, TARGET = 7, 6


class ClmHead(nn.Module):  # BertGenerationDecoder: RoBERTa embeddings + decoder layers with cross-attention, MLMHead
    def __init__(self):
        super().__init__()
        config = transformers.RobertaConfig(hidden_size=W, num_attention_heads=HEADS, intermediate_size=MLP,
                                            vocab_size=VOCAB, layer_norm_eps=1e-5, num_hidden_layers=TEXT_LAYERS,
                                            max_position_embeddings=24, type_vocab_size=1, pad_token_id=1,
                                            is_decoder=True, add_cross_attention=True, attn_implementation="eager")
        from transformers.models.roberta import modeling_roberta as hf_roberta

        self.bert = nn.Module()
        self.bert.embeddings = hf_roberta.RobertaEmbeddings(config)
        self.bert.encoder = hf_roberta.RobertaEncoder(config)
        self.lm_head = MLMHead(transformers.BertConfig(hidden_size=W, layer_norm_eps=1e-5, vocab_size=VOCAB))

    def forward(self, ids, states):
        h = self.bert.embeddings(input_ids=ids)
        t = ids.shape[1]
        causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        for layer in self.bert.encoder.layer:
            h = layer(h, causal, encoder_hidden_states=states)
            h = h[0] if isinstance(h, tuple) else h
        return self.lm_head(h)


class TorchPTUnifierFinetuned(TorchPTUnifier):
    def __init__(self, clm: bool):
        super().__init__()
        if clm:
            self.clm_proj = nn.Sequential(nn.Linear(W, W), nn.LayerNorm(W))
            self.clm_head = ClmHead()
        else:
            self.vqa_head = nn.Sequential(nn.Linear(2 * W, 2 * W), nn.LayerNorm(2 * W), nn.GELU(), nn.Linear(2 * W, ANSWERS))
            self.irtr_head = nn.Linear(2 * W, 1)
        for name, p in self.named_parameters():
            if name.startswith(("clm_", "vqa_", "irtr_")):
                p.data.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    torch.manual_seed(1)
    out = {}
    for clm in (False, True):
        model = TorchPTUnifierFinetuned(clm).eval()
        path = tmp_path_factory.mktemp("ptunifier_ft") / f"ft_{clm}.ckpt"
        torch.save({"state_dict": model.state_dict()}, str(path))
        out[clm] = (model, str(path))
    return out


def _inputs():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = rng.integers(5, VOCAB, size=(2, 7))
    ids[:, 0], ids[:, -1], mask = 0, 2, np.ones_like(ids)
    timg, tids, tmask = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids), torch.from_numpy(mask)
    return (images, ids, mask), (timg, tids, tmask)


FIELDS = dict(vision_heads=HEADS, text_heads=HEADS, fusion_heads=HEADS, num_visual_prompts=KV, num_textual_prompts=KT)


def test_finetuned_task_and_retrieval_heads_convert_with_parity(finetuned):
    torch_model, path = finetuned[False]
    model, variables, report = convert.load_with_report(path, **FIELDS)
    assert model.num_outputs == ANSWERS and not any(k.startswith(("vqa_head", "irtr_head")) for k in report.ignored)
    (images, ids, mask), (timg, tids, tmask) = _inputs()
    logits, score = jax.jit(lambda v: (model.apply(v, images, ids, mask, method=model.joint_logits),
                                       model.apply(v, images, ids, mask, method=model.match_score)))(variables)
    with torch.no_grad():
        cls = torch_model.infer(timg, tids, tmask)[2]
        np.testing.assert_allclose(np.asarray(logits), torch_model.vqa_head(cls).numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(score), torch_model.irtr_head(cls)[:, 0].numpy(), atol=TOL, rtol=0)
    itm = variables["params"]["itm_head"]  # row 0 ("not matched") stays the ITM head's
    np.testing.assert_array_equal(np.asarray(itm["kernel"])[:, 0], torch_model.itm_head.fc.weight[0].detach().numpy())
    # the same head under the original's other names (cls_head: language-only NLI, mlc_head: vision-only)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for name in ("cls_head", "mlc_head"):
        renamed = {(name + k[len("vqa_head"):] if k.startswith("vqa_head") else k): v for k, v in state.items()}
        fields = {**convert.PTUNIFIER_FULL, **convert.config_from_state_dict(renamed, name), **FIELDS}
        other = convert.model_for_state_dict(renamed, fields)
        params, _ = convert.convert_state_dict(renamed, other, name)
        for a, b in zip(jax.tree.leaves(params["task_head"]), jax.tree.leaves(variables["params"]["task_head"])):
            np.testing.assert_array_equal(a, b)


def test_finetuned_report_decoder_converts_with_parity(finetuned):
    torch_model, path = finetuned[True]
    model, variables, _ = convert.load_with_report(path, mode="vision", **FIELDS)
    assert model.decoder_layers == TEXT_LAYERS and model.mode == "vision"
    (images, ids, mask), (timg, tids, tmask) = _inputs()
    target = np.random.default_rng(2).integers(3, VOCAB, size=(2, TARGET))
    target[:, 0] = 0
    ours = jax.jit(lambda v: model.apply(v, images, ids, mask, target, np.ones_like(target),
                                         method=model.report_logits))(variables)
    with torch.no_grad():
        x, y, _ = torch_model.infer(timg, tids, tmask, pseudo_language=True)  # vision only: textual prompts
        states = torch_model.clm_proj(torch.cat([y, x], 1))
        want = torch_model.clm_head(torch.from_numpy(target), states)
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), atol=TOL, rtol=0)
