"""Swin UNETR pieces against hand-computed cases and MONAI's modules: window partition / reverse, the
shifted-window mask, the relative position index and bias (with MONAI's [:n, :n] quirk), the two PatchMerging
orders, the UNETR residual / up blocks, and the input-size check."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from medjax.nn import swin
from medjax.nn.swin_unetr import SwinUNETRBackbone, UnetrUpBlock

import monai.networks.nets.swin_unetr as monai_swin  # noqa: E402  (the test extra, monai==1.6.1)
import torch  # noqa: E402  (the torch test extra, torch==2.13.0 CPU build)


def test_window_partition_and_reverse_hand_case():
    x = np.arange(4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2, 1)  # value = 8 d + 2 h + w
    windows = swin.window_partition(jnp.asarray(x), (2, 2, 2))
    assert windows.shape == (4, 8, 1)
    np.testing.assert_array_equal(windows[0, :, 0], [0, 1, 2, 3, 8, 9, 10, 11])  # d 0-1, h 0-1
    np.testing.assert_array_equal(windows[1, :, 0], [4, 5, 6, 7, 12, 13, 14, 15])  # d 0-1, h 2-3
    np.testing.assert_array_equal(windows[2, :, 0], [16, 17, 18, 19, 24, 25, 26, 27])  # d 2-3, h 0-1
    np.testing.assert_array_equal(swin.window_reverse(windows, (2, 2, 2), (1, 4, 4, 2)), x)


def test_effective_window_shrinks_and_unshifts_small_axes():
    assert swin.effective_window((4, 8, 12), (7, 7, 7), (3, 3, 3)) == ((4, 7, 7), (0, 3, 3))
    assert swin.effective_window((7, 6, 14), (7, 7, 7), (0, 0, 0)) == ((7, 6, 7), (0, 0, 0))


def test_shift_mask_hand_case_and_monai():
    # dims (2, 2, 4), window 2, shift only along w (1): regions along w are [0, 1] | [2] | [3].
    mask = swin.shift_attention_mask((2, 2, 4), (2, 2, 2), (0, 0, 1))
    assert mask.shape == (2, 8, 8)
    np.testing.assert_array_equal(mask[0], 0.0)  # w 0-1: one region
    token_w = np.arange(8) % 2  # tokens (d, h, w) row-major: w is the fastest axis
    np.testing.assert_array_equal(mask[1], np.where(token_w[:, None] != token_w[None, :], -100.0, 0.0))
    expected = monai_swin.compute_mask([14, 7, 14], (7, 7, 7), (3, 0, 3), None).numpy()
    np.testing.assert_array_equal(swin.shift_attention_mask((14, 7, 14), (7, 7, 7), (3, 0, 3)), expected)


def test_relative_position_index_hand_case_and_monai():
    index = swin.relative_position_index((2, 2, 2))  # table (3 * 3 * 3); offset (a, b, c) -> 9 (a+1) + 3 (b+1) + c+1
    assert index.shape == (8, 8)
    assert index[0, 7] == 0  # (0,0,0) - (1,1,1) = (-1,-1,-1)
    assert index[7, 0] == 26  # (+1,+1,+1)
    assert index[1, 2] == 9 * 1 + 3 * 0 + 2  # (0,0,1) - (0,1,0) = (0,-1,+1)
    assert np.all(np.diag(index) == 13)
    attention = monai_swin.WindowAttention(12, 3, (7, 7, 7))
    np.testing.assert_array_equal(swin.relative_position_index((7, 7, 7)), attention.relative_position_index.numpy())


@pytest.mark.parametrize("loop_windows", [True, False])
@pytest.mark.parametrize("shift", [None, (1, 1, 0)])
def test_window_attention_matches_monai(shift, loop_windows):
    """Configured window 2^3, 3 heads. Unshifted: full windows (n = 8). Shifted: effective windows (2, 2, 1)
    (n = 4), where MONAI's bias uses index[:4, :4] of the 2^3 window (coords of a (1, 2, 2) window, not of the
    (2, 2, 1) one), plus the -100 region mask."""
    torch.manual_seed(0)
    dim, heads = 12, 3
    reference = monai_swin.WindowAttention(dim, heads, (2, 2, 2), qkv_bias=True)
    with torch.no_grad():
        reference.relative_position_bias_table.normal_()
    n, mask, regions = 8, None, None
    if shift:
        regions = swin.shift_region_labels((2, 2, 2), (2, 2, 1), shift)  # two windows of 4 tokens
        assert regions.shape == (2, 4) and len(np.unique(regions[0])) == 4
        mask = torch.from_numpy(swin.shift_attention_mask((2, 2, 2), (2, 2, 1), shift))
        n = 4
    x = torch.randn(2, n, dim)
    with torch.no_grad():
        expected = reference(x, mask).numpy()
    qkv_w, qkv_b = reference.qkv.weight.detach().numpy(), reference.qkv.bias.detach().numpy()
    params = {"relative_position_bias_table": reference.relative_position_bias_table.detach().numpy(),
              "qkv": {"kernel": qkv_w.T.reshape(dim, 3, heads, dim // heads), "bias": qkv_b.reshape(3, heads, -1)},
              "proj": {"kernel": reference.proj.weight.detach().numpy().T.reshape(heads, dim // heads, dim),
                       "bias": reference.proj.bias.detach().numpy()}}
    got = swin.WindowAttention(heads, (2, 2, 2), loop_windows).apply(
        {"params": params}, jnp.asarray(x.numpy())[None], None if regions is None else jnp.asarray(regions))
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-5)


def test_window_by_window_attention_has_the_batched_gradients():
    """The CPU path (lax.map over windows) against all windows at once: outputs and gradients."""
    keys = jax.random.split(jax.random.key(0), 3)
    windows = jax.random.normal(keys[0], (2, 3, 8, 12))  # batch 2, 3 windows of 8 tokens
    regions = jnp.asarray(np.random.default_rng(0).integers(0, 3, (3, 8)), jnp.int32)
    module = swin.WindowAttention(3, (2, 2, 2))
    params = module.init(keys[1], windows, regions)
    cotangent = jax.random.normal(keys[2], windows.shape)

    def value_and_grads(loop):
        fn = lambda p, w: swin.WindowAttention(3, (2, 2, 2), loop).apply(p, w, regions)  # noqa: E731
        out, pullback = jax.vjp(fn, params, windows)
        return out, pullback(cotangent)

    # jitted (as in training): one compile per path instead of one per op
    value_and_grads = jax.jit(value_and_grads, static_argnums=0)
    (looped, (dp_loop, dw_loop)), (batched, (dp, dw)) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(looped, batched, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw_loop, dw, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), dp_loop, dp)


def test_swin_block_passes_its_dtype_to_the_window_attention():
    # The block once passed dtype / param_dtype positionally into WindowAttention's loop_windows / dtype fields.
    block = swin.SwinBlock(2, (2, 2, 2), (0, 0, 0), dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 4, 8), jnp.float32)
    params = block.init(jax.random.key(0), x)
    _, state = block.apply(params, x, capture_intermediates=True)
    attn = state["intermediates"]["attn"]["__call__"][0]
    assert attn.dtype == jnp.bfloat16


def test_merging_orders_hand_case_and_monai():
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2, 1)  # value = 4 d + 2 h + w
    legacy = swin.merge_subgrids(jnp.asarray(x), legacy=True)[0, 0, 0, 0]
    fixed = swin.merge_subgrids(jnp.asarray(x), legacy=False)[0, 0, 0, 0]
    np.testing.assert_array_equal(legacy, [0, 4, 2, 1, 5, 2, 1, 7])  # [0,1,0] and [0,0,1] twice, no [1,1,0], [0,1,1]
    np.testing.assert_array_equal(fixed, [0, 4, 2, 1, 6, 5, 3, 7])
    from medjax.convert.torch_universal import legacy_patch_merging

    torch.manual_seed(0)
    y = torch.randn(2, 4, 2, 6, 3)
    for is_legacy, module in ((True, legacy_patch_merging()(3)), (False, monai_swin.PatchMerging(3))):
        with torch.no_grad():
            module.norm.weight.normal_()
            expected = module(y).numpy()
        params = {"norm": {"scale": module.norm.weight.detach().numpy(), "bias": module.norm.bias.detach().numpy()},
                  "reduction": {"kernel": module.reduction.weight.detach().numpy().T}}
        got = swin.PatchMerging(is_legacy).apply({"params": params}, jnp.asarray(y.numpy()))
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_up_block_matches_monai():
    from monai.networks.blocks import UnetrUpBlock as MonaiUp

    torch.manual_seed(0)
    reference = MonaiUp(3, 8, 4, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
    x, skip = torch.randn(2, 8, 2, 3, 2), torch.randn(2, 4, 4, 6, 4)
    with torch.no_grad():
        expected = reference(x, skip).numpy()
    conv = lambda m: np.asarray(m.conv.weight.detach().numpy()).transpose(2, 3, 4, 1, 0)  # noqa: E731
    block = reference.conv_block
    params = {"transp_conv": {"kernel": reference.transp_conv.conv.weight.detach().numpy().transpose(2, 3, 4, 0, 1)},
              "conv_block": {"conv1": {"kernel": conv(block.conv1)}, "conv2": {"kernel": conv(block.conv2)},
                             "conv3": {"kernel": conv(block.conv3)}}}
    cl = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 4, 1))  # noqa: E731
    got = UnetrUpBlock(4).apply({"params": params}, cl(x), cl(skip))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 4, 1, 2, 3), expected, atol=1e-5)


def test_backbone_shapes_and_input_check():
    model = SwinUNETRBackbone(feature_size=12)
    dec4, out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                               jax.ShapeDtypeStruct((2, 64, 32, 96, 1), jnp.float32))
    assert dec4.shape == (2, 2, 1, 3, 192) and out.shape == (2, 64, 32, 96, 12)
    with pytest.raises(ValueError, match=r"spatial size \(64, 48, 32\) must be a positive multiple of 32"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 64, 48, 32, 1), jnp.float32))
