"""UNI (timm ViT with LayerScale) -> Flax: a randomly initialised tiny timm-layout VisionTransformer saved
as pytorch_model.bin / .safetensors against `medjax.convert.uni.load`, fp32 within 1e-4; and the full
ViT-L/16 layout checked abstractly against the same PyTorch reference (no weights allocated on either side).

Here the reference is `TimmViT` below (tests/convert/test_uni_timm_parity.py checks UNI and UNI2-h against timm
itself, which the test extra now installs): a re-statement of the forward pass of timm 1.0's
`timm.models.vision_transformer.VisionTransformer` as UNI configures it (class token, learned position
embeddings with no_embed_class=False, qkv bias, LayerScale, LayerNorm eps 1e-6, global_pool="token",
num_classes=0), whose module names reproduce timm's state-dict keys exactly.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch  # the torch test extra (torch==2.13.0, CPU build)
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file
from torch import nn as tnn
from torch.nn import functional as F

from medjax.convert import uni
from medjax.nn import transformer

TOL = 1e-4
TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class PatchEmbed(tnn.Module):
    """timm.layers.PatchEmbed: Conv2d(3, dim, p, stride p) with bias, (B, C, H, W) -> (B, H*W/p^2, dim)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # norm is Identity in timm's ViT


class Attention(tnn.Module):
    """timm.models.vision_transformer.Attention: fused qkv, (B, N, 3, heads, head_dim) -> (3, B, heads, N, head_dim),
    softmax(q k^T / sqrt(head_dim)) v (Vaswani et al. 2017, eq. 1), heads concatenated, then `proj`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = tnn.Linear(dim, 3 * dim, bias=True)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(tnn.Module):
    """timm.layers.LayerScale (Touvron et al., CaiT 2021, eq. 4): x * gamma, one gamma per channel."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = tnn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(tnn.Module):
    """timm.layers.Mlp: fc1 -> GELU (exact erf) -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class Block(tnn.Module):
    """timm.models.vision_transformer.Block (pre-norm): x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(tnn.Module):
    """timm VisionTransformer (Dosovitskiy et al., ICLR 2021, eqs. 1-4) with class token, learned position
    embeddings over [cls; patches], LayerScale blocks, final LayerNorm and the class token as the feature
    (global_pool="token", head Identity). Images (B, 3, H, W) -> (B, dim)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, init_values, mlp_ratio=4.0):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = tnn.Parameter(0.02 * torch.randn(1, num_patches + 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = tnn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = tnn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def tiny_timm_vit(seed=0):
    """The timm ViT as UNI builds it (LayerScale init 1e-5, no classifier) at a tiny size, every parameter
    (LayerScale gammas included) perturbed by N(0, 0.2^2) so that gammas, biases and norms all matter."""
    torch.manual_seed(seed)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=1e-5).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def timm_features(model, pixels):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def reference():
    model = tiny_timm_vit()
    rgb = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    pixels = (rgb - IMAGENET_MEAN) / IMAGENET_STD  # channels-last for ours; timm_features transposes
    return model, pixels, timm_features(model, pixels)


def test_reference_state_dict_has_timm_keys():
    keys = set(tiny_timm_vit().state_dict())
    block = {f"blocks.1.{name}.{kind}" for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for kind in ("weight", "bias")} | {"blocks.1.ls1.gamma", "blocks.1.ls2.gamma"}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"} | block <= keys
    assert len(keys) == 4 + 2 * 14 + 2


def test_pytorch_model_bin_matches_timm(tmp_path, reference):
    model_ref, pixels, expected = reference
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(model_ref.state_dict(), path)
    model, variables = uni.load(path, **TINY)
    ours = np.asarray(jax.jit(model.apply)(variables, pixels))
    assert ours.shape == (3, 32) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)
    # LayerScale gammas arrive in the Flax tree unchanged, and they are far from their 1e-5 init.
    gamma = model_ref.blocks[1].ls2.gamma.detach().numpy()
    assert np.abs(gamma).max() > 0.1
    np.testing.assert_array_equal(np.asarray(variables["params"]["encoder"]["blocks_1"]["ls2"]), gamma)


def test_scanned_layout_loads_the_same_weights(tmp_path, reference):
    """scan=True: the per-block timm tensors stacked on axis 0 under encoder/blocks, the same features."""
    model_ref, pixels, expected = reference
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(model_ref.state_dict(), path)
    model, variables = uni.load(path, **TINY, scan=True)
    assert "blocks_0" not in variables["params"]["encoder"]
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, pixels)), expected, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(variables["params"]["encoder"]["blocks"]["ls2"][1]),
                                  model_ref.blocks[1].ls2.gamma.detach().numpy())


def test_safetensors_directory_and_classifier_head_ignored(tmp_path, reference):
    model_ref, pixels, expected = reference
    state = {k: v.detach().numpy().copy() for k, v in model_ref.state_dict().items()}
    state["head.weight"], state["head.bias"] = np.zeros((5, 32), np.float32), np.zeros(5, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    model, variables, report = uni.load_with_report(str(tmp_path), **TINY)
    assert report.ignored == ("head.bias", "head.weight")
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, pixels)), expected, atol=TOL, rtol=0)


def test_bad_checkpoints_name_every_problem(tmp_path):
    model = uni.uni_model(**TINY)
    expected = uni.timm_checkpoint_shapes(model, uni.timm_vit_map(model, uni.param_shapes(model)))
    assert len(expected) == 4 + 2 * 14 + 2  # cls, pos, patch w/b; 14 tensors per block; final norm
    state = {key: np.zeros(shape, np.float32) for key, shape in expected.items()}
    del state["blocks.1.ls1.gamma"]
    state["fc_norm.weight"] = np.zeros((32,), np.float32)
    state["blocks.0.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as error:
        uni.load(str(tmp_path / "bad.safetensors"), **TINY)
    message = str(error.value)
    assert "bad.safetensors" in message and "missing (1): blocks.1.ls1.gamma" in message
    assert "unexpected (1): fc_norm.weight" in message
    assert "blocks.0.mlp.fc1.weight has shape (64, 32), expected (128, 32)" in message
    with pytest.raises(ValueError, match="unknown model field"):
        uni.uni_model(heads=3)


def test_vit_l16_layout_matches_timm_vit_large_patch16_224():
    model = uni.uni_model()
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
    # Abstract init + forward (jax.eval_shape): nothing is allocated.
    features, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), images)
    assert features.shape == (2, 1024)
    shapes = {path: leaf.shape for path, leaf in flatten_dict(nn.unbox(variables["params"])).items()}
    enc = shapes
    assert enc[("encoder", "pos_embed")] == (1, 197, 1024) and enc[("encoder", "cls_token")] == (1, 1, 1024)
    assert enc[("encoder", "patch_embed", "proj", "kernel")] == (16, 16, 3, 1024)
    # 24 blocks scan (ViTEncoder.scan=None): one "blocks" module, the layer on axis 0.
    assert enc[("encoder", "blocks", "attn", "query", "kernel")] == (24, 1024, 16, 64)
    assert enc[("encoder", "blocks", "mlp", "fc1", "kernel")] == (24, 1024, 4096)
    assert enc[("encoder", "blocks", "ls2")] == (24, 1024)
    assert not any(name.startswith("blocks_") for _, name, *_ in enc)
    unrolled = transformer.unrolled_shapes(shapes)
    assert unrolled[("encoder", "blocks_23", "attn", "query", "kernel")] == (1024, 16, 64)
    assert ("encoder", "blocks_24", "ls1") not in unrolled
    # The state dict of UNI's timm model (vit_large_patch16_224, init_values=1e-5, num_classes=0), on the
    # meta device (shapes only), is what we expect.
    with torch.device("meta"):
        timm_model = TimmViT(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
    timm_shapes = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    assert timm_shapes["blocks.23.attn.qkv.weight"] == (3072, 1024) and timm_shapes["pos_embed"] == (1, 197, 1024)
    expected = uni.timm_checkpoint_shapes(model, uni.timm_vit_map(model, shapes))
    assert expected == timm_shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(p.numel() for p in timm_model.parameters())
    # timm's vit_large_patch16_224 without a head has 303,301,632 parameters; UNI adds 2 LayerScale gammas per block.
    assert sum(p.numel() for p in timm_model.parameters()) == 303_301_632 + 24 * 2 * 1024
