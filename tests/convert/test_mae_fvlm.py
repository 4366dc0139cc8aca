"""`python -m medjax.convert mae`: a 2D MAE ViT-B checkpoint (`{"model": state_dict}`, timm's
`vit_base_patch16_224` keys = MAE's; random weights, depth 2 to stay fast) -> fVLM's 3D ViT: every converted
block's forward equals timm's block within 1e-5, the final norm and the 2D -> 3D position table are MAE's, the
patch embedding is left to the model's initialisation, and the tree is the VolumeViT's without it (so
`--set init=` fills every other vision leaf; the Trainer path is in tests/test_train_fvlm.py). A checkpoint
that does not fit the config names the config field."""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")  # the test extra (torch, timm)
timm = pytest.importorskip("timm")

from medjax.checkpoint import restore_params  # noqa: E402
from medjax.convert import mae  # noqa: E402
from medjax.convert.__main__ import main  # noqa: E402
from medjax.convert.visd import read_released  # noqa: E402
from medjax.models.fvlm import pos_embed_from_2d  # noqa: E402
from medjax.nn.transformer import TransformerBlock  # noqa: E402

OVERRIDES = ["model.depth=2", "model.key_blocks=(0,)", "data.crop_shape=(32,32,64)"]  # grid 2 x 2 x 2


def random_mae(seed=0, **kwargs):
    """timm's vit_base_patch16_224 (MAE's encoder layout) with random weights: built on the meta device, filled
    with N(0, 0.02^2) matrices, N(0, 0.05^2) biases, LayerNorm scales 1 + N(0, 0.05^2), N(0, 0.5^2) tokens."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith(("cls_token", "pos_embed")):
                param.copy_(0.5 * noise)
            elif "norm" in key and key.endswith("weight"):
                param.copy_(1.0 + 0.05 * noise)
            else:
                param.copy_((0.05 if param.ndim == 1 else 0.02) * noise)
    return model.eval()


def save_mae(model, path, extra=None):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": state | (extra or {})}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    reference = random_mae(depth=2)
    root = tmp_path_factory.mktemp("mae")
    path = save_mae(reference, str(root / "mae_pretrain_vit_base.pth"),
                    {"mask_token": torch.zeros(1, 1, 768), "decoder_embed.weight": torch.zeros(512, 768)})
    out, printed = str(root / "params"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["mae", "--torch", path, "--out", out] + [a for o in OVERRIDES for a in ("--set", o)]) == 0
    return reference, path, restore_params(out), printed.getvalue()


def test_blocks_norm_and_positions_equal_mae(converted):
    reference, _, params, _ = converted
    vision = params["vision"]
    tokens = np.random.default_rng(0).normal(size=(2, 8, 768)).astype(np.float32)
    block = TransformerBlock(num_heads=12, mlp_dim=3072, layer_norm_eps=1e-5, mlp_bias_std=0.0)  # VolumeViT's
    apply = jax.jit(lambda p, x: block.apply({"params": p}, x))  # one compile for both blocks
    for i, torch_block in enumerate(reference.blocks):
        for norm in (torch_block.norm1, torch_block.norm2):
            norm.eps = 1e-5  # fVLM's ViT: torch LayerNorm's default eps (MAE's own blocks use 1e-6)
        got = apply(vision[f"blocks_{i}"], jnp.asarray(tokens))
        with torch.no_grad():
            want = torch_block(torch.from_numpy(tokens)).numpy()
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f"block {i}")
    np.testing.assert_array_equal(vision["norm"]["scale"], reference.norm.weight.detach().numpy())
    pos = reference.pos_embed.detach().numpy()  # (1, 1 + 14 x 14, 768)
    np.testing.assert_allclose(vision["pos_embed"], pos_embed_from_2d(pos, (14, 14), (2, 2, 2)), atol=1e-6)


def test_tree_is_the_volume_vit_without_the_patch_embedding(converted):
    _, _, params, printed = converted
    model = mae.volume_vit("full", OVERRIDES)
    want = {k: s for k, s in mae.param_shapes(model).items() if k[0] != "patch_embed"}
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params["vision"]).items()}
    assert got == want
    assert "left to the model's initialisation at --set init= (2): vision/patch_embed/bias, vision/patch_embed/kernel" in printed
    assert ("ignored (5): cls_token, decoder_embed.weight, mask_token, patch_embed.proj.bias, patch_embed.proj.weight"
            in printed)


def test_a_checkpoint_that_does_not_fit_the_config_names_the_field(converted, capsys, tmp_path):
    _, path, _, _ = converted
    assert main(["mae", "--torch", path, "--out", str(tmp_path / "out"), "--set", "data.crop_shape=(32,32,64)"]) != 0
    err = capsys.readouterr().err
    assert "depth=2" in err and "model.depth=12" in err
    state = {k: v for k, v in read_released(path).items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"missing \(1\): blocks\.1\.norm2\.bias"):
        mae.convert_state_dict(state, mae.volume_vit("full", OVERRIDES), "x.pth")
