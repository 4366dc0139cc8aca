"""PTUnifier fine-tuned Lightning checkpoints -> Flax: the released module's task heads (`vqa_head`, and the
same Sequential as `cls_head` / `mlc_head`), the retrieval `irtr_head` (-> the ITM head's "matched" row) and the
report generator's `clm_proj` + `clm_head` (a BertGenerationDecoder), restated on top of
medjax/convert/torch_ptunifier.py with random weights, converted and compared within 1e-4."""
import jax
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from medjax.convert import ptunifier as convert
from medjax.convert.torch_ptunifier import Dims, MLMHead, TorchPTUnifier

TOL = 1e-4
D = Dims()
W, HEADS, MLP, VOCAB, KV, KT, TEXT_LAYERS = D.width, D.heads, D.mlp, D.vocab, D.visual_prompts, D.textual_prompts, D.text_layers
IMAGE = D.image

ANSWERS, TARGET = 7, 6


class ClmHead(nn.Module):  # BertGenerationDecoder: RoBERTa embeddings + decoder layers with cross-attention, MLMHead
    def __init__(self):
        super().__init__()
        config = transformers.RobertaConfig(hidden_size=W, num_attention_heads=HEADS, intermediate_size=MLP,
                                            vocab_size=VOCAB, layer_norm_eps=1e-5, num_hidden_layers=TEXT_LAYERS,
                                            max_position_embeddings=D.text_positions, type_vocab_size=1, pad_token_id=1,
                                            is_decoder=True, add_cross_attention=True, attn_implementation="eager")
        from transformers.models.roberta import modeling_roberta as hf_roberta

        self.bert = nn.Module()
        self.bert.embeddings = hf_roberta.RobertaEmbeddings(config)
        self.bert.encoder = hf_roberta.RobertaEncoder(config)
        self.lm_head = MLMHead(D.bert_config())

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
