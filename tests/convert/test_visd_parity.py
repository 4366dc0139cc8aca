"""ViSD-Boost converter parity: a PyTorch model of the released architecture (VISDBOOST's module names: MedicalNet
ResNet + proj1..4, id_projs + ViT_VAE encoder/decoder + VectorQuantizerEMA buffers, nn.MultiheadAttention, per-organ
res_projs / vision_projs, a BERT text tower + text_proj, temp) on random weights, at toy widths; its state dict
converted; the organ embeddings of `forward_test_win` (hybrid features, eval mode) and the prompt embeddings
equal ours."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from medjax.convert.visd import convert_state_dict
from medjax.models.visd import ViSD, ViSDVision
from medjax.nn.bert import BertEncoder
from tests.nn.test_resnet3d import TorchResNet

C, DIM, HEADS, HEAD_DIM, MLP, CODES, E, WIDTH = 16, 24, 2, 8, 32, 3, 8, 4


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads, self.norm = HEADS, torch.nn.LayerNorm(DIM)
        self.to_qkv = torch.nn.Linear(DIM, 3 * HEADS * HEAD_DIM, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(HEADS * HEAD_DIM, DIM), torch.nn.Dropout(0.1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, -1))
        out = torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5, -1) @ v  # 'b n (h d) -> b h n d' and back
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Transformer(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        ff = lambda: torch.nn.Sequential(torch.nn.LayerNorm(DIM), torch.nn.Linear(DIM, MLP), torch.nn.GELU(),  # noqa
                                         torch.nn.Dropout(0.1), torch.nn.Linear(MLP, DIM), torch.nn.Dropout(0.1))
        self.layers = torch.nn.ModuleList([torch.nn.ModuleList([Attention(), torch.nn.Module()]) for _ in range(depth)])
        for layer in self.layers:
            layer[1].net = ff()

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff.net(x) + x
        return self.norm(x)


class Coder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.transformer = Transformer(2)
        if encoder:
            self.input1, self.input2 = torch.nn.Linear(C, 2 * C), torch.nn.Linear(2 * C, DIM)
        else:
            self.output1, self.output2 = torch.nn.Linear(DIM, 2 * C), torch.nn.Linear(2 * C, C)


class TorchViSD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual_encoder = torch.nn.Module()
        self.visual_encoder.res_model = TorchResNet(WIDTH, detach=True, blocks=1)  # ResNet-10: half the compile
        for s in range(4):
            setattr(self.visual_encoder, f"proj{s + 1}", torch.nn.Conv3d(WIDTH * 2 ** s, C, 1))
        self.id_projs, self.encoder, self.decoder = torch.nn.Linear(1, C), Coder(True), Coder(False)
        self.vq_layer = torch.nn.Module()
        self.vq_layer.register_buffer("embeddings", torch.randn(4 * CODES, DIM))
        self.vq_layer.ema_dw, self.vq_layer.ema_cluster_size = torch.nn.Module(), torch.nn.Module()
        self.vq_layer.ema_dw.register_buffer("hidden", torch.randn(4 * CODES, DIM))
        self.vq_layer.ema_cluster_size.register_buffer("hidden", torch.rand(4 * CODES))
        self.attention = torch.nn.MultiheadAttention(C, 4, dropout=0.1, batch_first=True)
        self.query_tokens = torch.nn.Parameter(torch.randn(4, C))
        self.res_projs1 = torch.nn.ModuleList([torch.nn.Linear(2 * C, C) for _ in range(4)])
        self.res_projs2 = torch.nn.ModuleList([torch.nn.Linear(C, C) for _ in range(4)])
        self.vision_projs = torch.nn.ModuleList([torch.nn.Linear(C, E) for _ in range(4)])
        self.text_encoder = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=32, max_position_embeddings=16),
                                      add_pooling_layer=False)
        self.text_proj, self.temp = torch.nn.Linear(16, E), torch.nn.Parameter(torch.tensor(0.07))

    def organ_embedding(self, image, mask, organ_id):
        """forward_test_win's computation for one organ of one sample (the original, condensed)."""
        maps = self.visual_encoder.res_model(image)
        embeds = [getattr(self.visual_encoder, f"proj{s + 1}")(m).flatten(2).transpose(1, 2)[0] for s, m in enumerate(maps)]
        one = (mask == organ_id + 1).float()[None, None]
        keys = [e[(F.max_pool3d(one, k, k).flatten(1) > 0)[0]][None] for e, k in
                zip(embeds, ((2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32)))]
        roi, other = keys[3], torch.cat(keys[:3], 1)
        lo = roi.min()
        hi = (roi - lo).max()
        x = torch.cat([self.id_projs(torch.tensor([[[float(organ_id)]]])), (roi - lo) / hi - 0.5], 1)
        z = self.encoder.transformer(self.encoder.input2(self.encoder.input1(x)))[:, 1:]
        flat = z.reshape(-1, DIM)
        codebook = self.vq_layer.embeddings
        idx = torch.argmin((flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.T, 1)
        r = self.decoder.output2(self.decoder.output1(self.decoder.transformer(F.embedding(idx, codebook).view_as(z))))
        recon = (r + 0.5) * hi + lo
        hybrid = torch.cat([torch.cat([other, roi], 1), torch.cat([other, recon], 1)], -1)
        hybrid = self.res_projs2[organ_id](self.res_projs1[organ_id](hybrid))
        pooled, _ = self.attention(self.query_tokens[organ_id][None, None], hybrid, hybrid)
        return F.normalize(self.vision_projs[organ_id](pooled[:, 0]), dim=-1)[0]


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    net = TorchViSD().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1 and p is not net.temp:
                p.uniform_(-0.3, 0.3)  # non-zero biases, LayerNorm shifts
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    vision = ViSDVision(depth=10, width=WIDTH, token_dim=C, pool_heads=4, embed_dim=E,
                        vq=dict(dim=DIM, depth=2, num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, codes_per_organ=CODES))
    text = BertEncoder(vocab_size=40, width=16, depth=1, num_heads=4, mlp_dim=32, max_positions=16, add_pooling_layer=False)
    model = ViSD(vision, text, embed_dim=E)
    params, report = convert_state_dict({k: v.numpy() for k, v in net.state_dict().items()}, "random", model=model)
    assert report.ok
    return net, model, params


def test_organ_and_prompt_embeddings_equal_the_original(converted):
    net, model, params = converted
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 16, 64, 64)).astype(np.float32)
    mask = np.zeros((16, 64, 64), np.int64)
    mask[2:12, 4:40, 6:30], mask[4:14, 30:60, 28:60], mask[0:16, 20:28, 30:38], mask[6:10, 40:50, 10:20] = 1, 2, 3, 4
    variables = {"params": params["model"], "batch_stats": params["batch_stats"], "codebook": params["codebook"]}
    ours = np.asarray(jax.jit(lambda v, x, m: model.apply(v, x, m, method=ViSD.image_embeddings))(
        variables, jnp.asarray(image[..., None]), jnp.asarray(mask[None], jnp.int32)))[0]
    with torch.no_grad():
        for organ in range(4):
            want = net.organ_embedding(torch.from_numpy(image[None]), torch.from_numpy(mask), organ).numpy()
            np.testing.assert_allclose(ours[organ], want, rtol=2e-3, atol=2e-4)
        ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
        att = torch.tensor([[1, 1, 1, 1, 0, 0]])
        want = F.normalize(net.text_proj(net.text_encoder(ids, attention_mask=att).last_hidden_state[:, 0]), dim=-1)
    got = model.apply(variables, jnp.asarray(ids.numpy())[None], jnp.asarray(att.numpy())[None],
                      method=ViSD.text_embeddings)
    np.testing.assert_allclose(np.asarray(got)[0, 0], want.numpy()[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(params["model"]["temp"]), 0.07, rtol=1e-6)
