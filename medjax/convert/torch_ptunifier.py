"""PyTorch restatements of the released PTUnifier (`PTUnifierTransformerSS`, zhjohnchan/PTUnifier) and of METER
(`METERTransformerSS`, zdou0830/METER), whose state dicts carry the originals' keys because the modules carry
their attribute names: OpenAI CLIP `VisualTransformer` with `layers - 1` blocks kept as METER's builder does,
HF RobertaModel, METER's `BertCrossLayer` built from HF BertAttention / BertIntermediate / BertOutput, the
poolers, heads and (PTUnifier) the two prompt pools. Used by the converter parity tests (random weights at a
tiny `Dims`) and by `python -m medjax.bench vs-torch --exp ptunifier` (the paper's `Dims`, `attn_implementation`
"sdpa"); `infer` is each original's forward (eval mode; in train mode with HF's dropout). torch and
transformers are test extras: nothing here is needed to train or run medjax."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
import transformers
from torch import nn
from transformers.models.bert import modeling_bert as hf_bert


@dataclasses.dataclass(frozen=True)
class Dims:
    width: int = 32
    heads: int = 4
    mlp: int = 48  # text / fusion FFN (CLIP's is 4 x width)
    vocab: int = 50
    pool: int = 12
    visual_prompts: int = 5
    textual_prompts: int = 4
    patch: int = 8
    image: int = 32
    clip_layers: int = 3  # the CLIP checkpoint's; the towers keep clip_layers - 1 (METER's builder)
    text_layers: int = 2
    fusion: int = 2
    text_positions: int = 24
    clip_mlp: int = 0  # CLIP's FFN; 0 = 4 x width (CLIP's)
    attn_implementation: str = "eager"  # HF attention of the text tower and the co-attention layers ("sdpa": fused)

    def bert_config(self, **extra) -> transformers.BertConfig:
        return transformers.BertConfig(hidden_size=self.width, num_attention_heads=self.heads,
                                       intermediate_size=self.mlp, vocab_size=self.vocab, layer_norm_eps=1e-5,
                                       attn_implementation=self.attn_implementation, max_position_embeddings=20,
                                       **extra)

    def roberta(self) -> transformers.RobertaModel:
        return transformers.RobertaModel(transformers.RobertaConfig(
            hidden_size=self.width, num_attention_heads=self.heads, intermediate_size=self.mlp, vocab_size=self.vocab,
            layer_norm_eps=1e-5, attn_implementation=self.attn_implementation, num_hidden_layers=self.text_layers,
            max_position_embeddings=self.text_positions, type_vocab_size=1, pad_token_id=1))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):  # OpenAI CLIP
    def __init__(self, d: Dims):
        super().__init__()
        w, mlp = d.width, d.clip_mlp or 4 * d.width
        self.attn = nn.MultiheadAttention(w, d.heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(w, mlp)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(mlp, w))]))

    def forward(self, x):  # (L, N, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(d) for _ in range(d.clip_layers - 1)])  # METER


class VisualTransformer(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        w = d.width
        self.conv1 = nn.Conv2d(3, w, d.patch, d.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((d.image // d.patch) ** 2 + 1, w) * w ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.transformer = Transformer(d)

    def embed(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        return torch.cat([cls, x], 1) + self.positional_embedding

    def trans(self, x):
        x = self.transformer.resblocks(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)


class CLIP(nn.Module):
    """METER's CLIP: the visual tower plus the text side's leftovers (PTUnifier's also keeps token_embedding)."""

    def __init__(self, d: Dims, token_embedding: bool = True):
        super().__init__()
        self.visual = VisualTransformer(d)
        if token_embedding:
            self.token_embedding = nn.Embedding(20, d.width)
        self.positional_embedding = nn.Parameter(torch.randn(7, d.width))
        self.ln_final = nn.LayerNorm(d.width)


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
    def __init__(self, w):
        super().__init__()
        self.dense = nn.Linear(w, w)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class MLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = hf_bert.BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.randn(config.vocab_size) * 0.1)

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class ITMHead(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w, 2)


class ITCHead(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.vision_ln, self.language_ln = nn.LayerNorm(2 * w), nn.LayerNorm(2 * w)
        self.vision_proj, self.language_proj = nn.Linear(2 * w, w, bias=False), nn.Linear(2 * w, w, bias=False)


def extended(mask):
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def randomise(module: nn.Module) -> None:
    """LayerNorm / bias defaults are 1 / 0: perturb every parameter so that each one matters."""
    for p in module.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)


def encode_and_fuse(text_encoder, visual, text, image, mask, text_proj, image_proj, modality, text_layers,
                    image_layers, text_pooler, image_pooler):
    """The shared METER / PTUnifier forward after the embeddings: text layers, ViT, projections + modality
    embeddings, the co-attention stack (both streams from the previous layer's outputs), the two poolers."""
    for layer in text_encoder.encoder.layer:
        text = layer(text, extended(mask))
        text = text[0] if isinstance(text, tuple) else text
    x = text_proj(text) + modality(torch.zeros_like(mask))
    image = image_proj(visual.trans(image))
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    y = image + modality(torch.ones_like(image_mask))
    for text_layer, image_layer in zip(text_layers, image_layers):
        x, y = (text_layer(x, y, extended(mask), extended(image_mask)),
                image_layer(y, x, extended(image_mask), extended(mask)))
    return x, y, torch.cat([text_pooler(x), image_pooler(y)], -1)


class TorchPTUnifier(nn.Module):
    """The released `PTUnifierTransformerSS`'s attributes and `infer` (eval mode), restated."""

    def __init__(self, d: Dims = Dims()):
        super().__init__()
        self.d = d
        cross, w = d.bert_config(), d.width
        self.vision_encoder = CLIP(d)
        self.language_encoder = d.roberta()
        self.multi_modal_language_proj, self.multi_modal_vision_proj = nn.Linear(w, w), nn.Linear(w, w)
        self.modality_type_embeddings = nn.Embedding(2, w)
        self.multi_modal_vision_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(d.fusion)])
        self.multi_modal_language_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(d.fusion)])
        self.multi_modal_vision_pooler, self.multi_modal_language_pooler = Pooler(w), Pooler(w)
        self.mlm_head, self.itm_head, self.itc_head = MLMHead(cross), ITMHead(2 * w), ITCHead(w)
        self.pseudo_vision_token_pool = nn.Parameter(torch.randn(d.pool, w))
        self.pseudo_language_token_pool = nn.Parameter(torch.randn(d.pool, w))
        randomise(self)

    @staticmethod
    def find(query, pool, k):
        return pool[(query @ pool.T).topk(k, -1)[1]]

    def infer(self, img, ids, mask, pseudo_vision=False, pseudo_language=False):
        d, embeddings, visual = self.d, self.language_encoder.embeddings, self.vision_encoder.visual
        if pseudo_vision:
            text = embeddings(input_ids=ids)
            query = (text[:, 1:] * mask[:, 1:, None]).sum(1) / (mask[:, 1:].sum(1, keepdims=True) + 1e-8)
            cls = (visual.class_embedding + visual.positional_embedding[:1]).expand(len(ids), 1, d.width)
            image = torch.cat([cls, self.find(query, self.pseudo_vision_token_pool, d.visual_prompts)], 1)
        elif pseudo_language:
            image = visual.embed(img)
            prompts = self.find(image[:, 1:].mean(1), self.pseudo_language_token_pool, d.textual_prompts)
            special = lambda t: embeddings(input_ids=torch.full((len(img), 1), t, dtype=torch.long))  # noqa: E731
            text = torch.cat([special(0), prompts, special(2)], 1)
            mask = torch.ones(text.shape[:2], dtype=torch.long)
        else:
            text, image = embeddings(input_ids=ids), visual.embed(img)
        return encode_and_fuse(self.language_encoder, visual, text, image, mask, self.multi_modal_language_proj,
                               self.multi_modal_vision_proj, self.modality_type_embeddings,
                               self.multi_modal_language_layers, self.multi_modal_vision_layers,
                               self.multi_modal_language_pooler, self.multi_modal_vision_pooler)


class TorchMETER(nn.Module):
    """The released `METERTransformerSS` (CLIP-ViT + RoBERTa, the pretraining heads; `vqa_classifier` as a
    fine-tuned METER also holds) with its attribute names and `infer` (eval mode), restated."""

    def __init__(self, d: Dims = Dims(), vqa_answers: int = 0):
        super().__init__()
        cross, w = d.bert_config(), d.width
        self.cross_modal_text_transform, self.cross_modal_image_transform = nn.Linear(w, w), nn.Linear(w, w)
        self.token_type_embeddings = nn.Embedding(2, w)
        self.vit_model = CLIP(d, token_embedding=False)
        self.text_transformer = d.roberta()  # RobertaModel.from_pretrained: with its pooler
        self.cross_modal_image_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(d.fusion)])
        self.cross_modal_text_layers = nn.ModuleList([BertCrossLayer(cross) for _ in range(d.fusion)])
        self.cross_modal_image_pooler, self.cross_modal_text_pooler = Pooler(w), Pooler(w)
        self.mlm_score, self.itm_score = MLMHead(cross), ITMHead(2 * w)
        if vqa_answers:
            self.vqa_classifier = nn.Sequential(nn.Linear(2 * w, 2 * w), nn.LayerNorm(2 * w), nn.GELU(),
                                                nn.Linear(2 * w, vqa_answers))
        randomise(self)

    def infer(self, img, ids, mask):
        """METER's `infer`: (text_feats, image_feats, cls_feats) of image + text."""
        visual = self.vit_model.visual
        return encode_and_fuse(self.text_transformer, visual, self.text_transformer.embeddings(input_ids=ids),
                               visual.embed(img), mask, self.cross_modal_text_transform,
                               self.cross_modal_image_transform, self.token_type_embeddings,
                               self.cross_modal_text_layers, self.cross_modal_image_layers,
                               self.cross_modal_text_pooler, self.cross_modal_image_pooler)
