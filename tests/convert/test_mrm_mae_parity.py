"""MAE pretraining state dict (facebookresearch/mae keys, the model MRM's authors train) -> medjax's MAE: the
PyTorch restatement (medjax/convert/torch_mae.py: timm ViT blocks + MAE's decoder) with random weights, converted
into both layer layouts and fed the same masking (`medjax.bench.torch_rows.mae_masking`), gives the same predicted
patches and the same loss; a non-sin-cos decoder table and a missing key are errors naming them."""
import jax
import numpy as np
import pytest
import torch

from medjax.bench.torch_rows_vit import mae_masking
from medjax.convert import mrm_mae as convert
from medjax.convert.torch_mae import mae_torch
from medjax.losses.reconstruction import masked_image_mse
from medjax.models.mrm_mae import MAE

FIELDS = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0, decoder_width=16,
              decoder_depth=2, decoder_heads=2)


@pytest.fixture(scope="module")
def torch_mae():
    torch.manual_seed(0)
    net = mae_torch(**FIELDS, norm_pix_loss=True).eval()
    return net, {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("scan", [False, True])
def test_converted_mae_matches_the_torch_restatement(torch_mae, scan):
    net, state = torch_mae
    model = MAE(**FIELDS, mask_ratio=0.75, scan=scan)
    params = convert.convert_state_dict(state, model, "random weights")
    assert ("blocks" in params["image_encoder"]) == scan and "decoder_block_1" in params
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)
    key = jax.random.key(3)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, rngs={"masking": key}))(params, images)
    ids_keep, ids_restore, mask = mae_masking(model, key, 2)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask)  # the same masking on both sides
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        pred = net(x, torch.from_numpy(ids_keep).long(), torch.from_numpy(ids_restore).long())
        loss = net.loss(x, pred, torch.from_numpy(mask))
    np.testing.assert_allclose(np.asarray(out["pred"]), pred.numpy(), atol=1e-5, rtol=0)
    ours = masked_image_mse(out["pred"], images, 8, norm_pix_loss=True, patch_mask=out["mask"])
    np.testing.assert_allclose(float(ours), float(loss), rtol=1e-5)


def test_key_problems_are_named(torch_mae):
    _, state = torch_mae
    model = MAE(**FIELDS)
    bad = dict(state, decoder_pos_embed=state["decoder_pos_embed"] + 1.0)
    with pytest.raises(ValueError, match="ckpt.pth: decoder_pos_embed .* not MAE's fixed 2D sin-cos"):
        convert.convert_state_dict(bad, model, "ckpt.pth")
    missing = {k: v for k, v in state.items() if k != "decoder_pred.bias"}
    with pytest.raises(ValueError, match="decoder_pred.bias"):
        convert.convert_state_dict(missing, model, "ckpt.pth")
