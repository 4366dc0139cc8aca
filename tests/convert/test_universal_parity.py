"""CLIP-Driven Universal Model: a randomly initialised PyTorch restatement of the original (MONAI SwinUNETR
with MONAI 0.9's PatchMerging + the head) -> medjax.convert.universal -> the same logits (fp32, 64^3);
the key report names every missing / unexpected key and shape mismatch; the CLI writes restorable params."""
import numpy as np
import pytest

import monai  # noqa: E402,F401  (the test extra, monai==1.6.1: the original's SwinUNETR)
import torch  # noqa: E402  (the torch test extra, torch==2.13.0 CPU build)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from medjax.checkpoint import restore_params  # noqa: E402
from medjax.convert import __main__ as cli  # noqa: E402
from medjax.convert import torch_universal, universal  # noqa: E402

FEATURE, GROUPS = 12, 4  # feature size 12 (MONAI's smallest), GroupNorm(4): the paper's layout at toy width


def _randomise_norms(module, seed):
    """Non-trivial affine params for every norm (PyTorch inits them to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)):
                sub.weight.copy_(1 + 0.2 * torch.randn(sub.weight.shape, generator=gen))
                sub.bias.copy_(0.2 * torch.randn(sub.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def swin_torch():
    torch.manual_seed(0)
    net = torch_universal.universal_torch(feature_size=FEATURE, norm_groups=GROUPS).eval()
    _randomise_norms(net, 1)
    return net


@pytest.fixture(scope="module")
def swin_state(swin_torch):
    return {f"module.{k}": v.numpy() for k, v in swin_torch.state_dict().items()}  # DataParallel names


def test_swin_universal_logits_match_the_original_64cube(swin_torch, swin_state):
    model, variables, report = universal.convert_state_dict(swin_state, norm_groups=GROUPS)
    assert report.ok and not report.missing and len(report.ignored) == 8  # the relative_position_index buffers
    assert model.backbone.feature_size == FEATURE and model.backbone.legacy_merging
    assert variables["constants"]["organ_embedding"].shape == (32, 512)
    x = np.random.default_rng(0).standard_normal((1, 1, 64, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = swin_torch(torch.from_numpy(x)).numpy()
    logits = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    got = np.asarray(logits).transpose(0, 4, 1, 2, 3)
    assert got.shape == expected.shape == (1, 32, 64, 64, 64)
    assert np.abs(expected).max() > 0.1 and expected.std() > 1e-2  # not a degenerate output
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_key_report_names_every_problem(swin_state):
    state = dict(swin_state)
    del state["module.controller.bias"]
    state["module.extra.weight"] = np.zeros(3, np.float32)
    state["module.GAP.3.weight"] = np.zeros((256, 8, 1, 1, 1), np.float32)
    with pytest.raises(ValueError) as error:
        universal.convert_state_dict(state, norm_groups=GROUPS, source="ckpt.pth")
    message = str(error.value)
    assert "ckpt.pth" in message and "controller.bias" in message and "module.extra.weight" in message
    assert "GAP.3.weight has shape (256, 8, 1, 1, 1), expected (256, 192, 1, 1, 1)" in message


def test_relative_position_index_is_checked(swin_state):
    state = dict(swin_state)
    key = "module.swinViT.layers2.0.blocks.1.attn.relative_position_index"
    state[key] = state[key][::-1].copy()
    with pytest.raises(ValueError, match="layers2.0.blocks.1.attn.relative_position_index"):
        universal.convert_state_dict(state, norm_groups=GROUPS)


def test_plain_monai_state_dict_reports_the_missing_head():
    torch.manual_seed(0)
    monai_net = torch_universal.swin_unetr_torch(out_channels=3, feature_size=FEATURE)
    state = {k: v.numpy() for k, v in monai_net.state_dict().items()}
    with pytest.raises(ValueError) as error:
        universal.convert_state_dict(state, norm_groups=GROUPS)
    message = str(error.value)
    for key in ("controller.weight", "precls_conv.2.weight", "GAP.0.weight", "text_to_vision.bias", "organ_embedding"):
        assert key in message
    assert "swinViT" not in message.split("missing")[1].split("\n")[0]  # the backbone is complete
    assert "allow_missing_head" in message


def test_backbone_prefix_and_torch_file_and_cli(swin_torch, tmp_path):
    # The newest original code saves the backbone under `backbone.`; the released file has it top-level.
    state = {("module.backbone." + k if k.startswith(("swinViT", "encoder", "decoder")) else "module." + k): v
             for k, v in swin_torch.state_dict().items()}
    path = str(tmp_path / "universal.pth")
    torch.save({"net": state, "epoch": 3}, path)
    assert cli.main(["universal", "--torch", path, "--out", str(tmp_path / "out"), "--norm-groups", str(GROUPS)]) == 0
    params = restore_params(str(tmp_path / "out"))
    np.testing.assert_array_equal(params["controller"]["kernel"][0, 0, 0],
                                  swin_torch.controller.weight.detach().numpy()[:, :, 0, 0, 0].T)
    qkv = swin_torch.swinViT.layers1[0].blocks[1].attn.qkv.weight.detach().numpy()  # (3 * 12, 12)
    kernel = params["backbone"]["swinViT"]["layers1"]["blocks_1"]["attn"]["qkv"]["kernel"]  # (12, 3, heads, 4)
    np.testing.assert_array_equal(kernel[:, 1, 2], qkv[12 + 8:12 + 12].T)  # k projection, head 2
    embedding = np.load(tmp_path / "out" / "class_embeddings.npy")
    np.testing.assert_array_equal(embedding, swin_torch.organ_embedding.numpy())
    assert cli.main(["universal", "--torch", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o2")]) == 2


def test_backbone_only_checkpoint_with_initialised_head():
    torch.manual_seed(0)
    monai_net = torch_universal.swin_unetr_torch(out_channels=3, feature_size=FEATURE)
    state = {k: v.numpy() for k, v in monai_net.state_dict().items()}
    model, variables, report = universal.convert_state_dict(state, norm_groups=GROUPS, allow_missing_head=True)
    assert set(report.missing) == {"controller.weight", "controller.bias", "precls_conv.0.weight", "precls_conv.0.bias",
                                   "precls_conv.2.weight", "precls_conv.2.bias", "GAP.0.weight", "GAP.0.bias",
                                   "GAP.3.weight", "GAP.3.bias", "text_to_vision.weight", "text_to_vision.bias",
                                   "organ_embedding"}
    assert "out.conv.conv.weight" in report.ignored and not report.unexpected
    params = variables["params"]
    assert params["controller"]["kernel"].shape == (1, 1, 1, 512, 153)
    assert float(params["controller"]["kernel"].std()) > 0
    assert params["GAP"]["conv"]["kernel"].shape == (1, 1, 1, 16 * FEATURE, 256)
    assert variables["constants"]["organ_embedding"].shape == (32, 512)
    conv1 = monai_net.encoder1.layer.conv1.conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
    np.testing.assert_array_equal(params["backbone"]["encoder1"]["layer"]["conv1"]["kernel"], conv1)
    shapes = universal.variable_shapes(model)
    assert {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(variables).items()} == shapes


def test_whole_monai_swin_unetr_with_current_merging():
    torch.manual_seed(0)
    monai_net = torch_universal.swin_unetr_torch(out_channels=3, feature_size=FEATURE, legacy_merging=False).eval()
    _randomise_norms(monai_net, 2)
    state = {k: v.numpy() for k, v in monai_net.state_dict().items()}
    model, variables, report = universal.convert_monai_swin_unetr(state)
    assert report.ok and not model.legacy_merging and model.out_channels == 3
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 64, 32), dtype=np.float32)
    with torch.no_grad():
        expected = monai_net(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))).transpose(0, 4, 1, 2, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
