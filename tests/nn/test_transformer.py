"""medjax/nn/transformer.py, layer_stack.py: the scanned and the unrolled stack agree (values, gradients, every
remat policy), the layout helpers move params between them, and the MLP / LayerScale / attention variants match their
formulas."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.checkpoint import merge_params
from medjax.nn import layer_stack as S
from medjax.nn import transformer as T
from medjax.nn import transformer_layout as layout
from medjax.nn.vit import ViTEncoder

KW = dict(image_size=16, patch_size=8, width=16, depth=3, num_heads=2, mlp_ratio=2.0, layerscale_init=0.1)
IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def unrolled_params():
    model = ViTEncoder(**KW, scan=False)
    return jax.jit(model.init)(jax.random.key(1), IMAGES)["params"]


def _loss(model, params, train=False):
    out = model.apply({"params": params}, IMAGES, train=train, rngs={"dropout": jax.random.key(3)})
    return jnp.mean(jnp.sin(out))


_jit_loss = jax.jit(_loss, static_argnums=(0, 2))  # one compile per (model, train), not one per op


@pytest.fixture(scope="module")
def reference(unrolled_params):
    """Loss and gradients of the plain unrolled stack (no remat), which every layout and remat policy must give."""
    return jax.jit(jax.value_and_grad(lambda p: _loss(ViTEncoder(**KW, scan=False), p)))(unrolled_params)


def test_layouts_and_helpers(unrolled_params):
    scanned_model = ViTEncoder(**KW, scan=True)
    abstract = jax.eval_shape(scanned_model.init, jax.random.key(0), IMAGES)["params"]
    stacked = layout.stack_layers(unrolled_params)
    assert sorted(k for k in unrolled_params if k.startswith("blocks")) == ["blocks_0", "blocks_1", "blocks_2"]
    assert "blocks" in stacked and not any(k.startswith("blocks_") for k in stacked)
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract)
    assert [a.shape for a in jax.tree.leaves(nn.unbox(stacked))] == [b.shape for b in jax.tree.leaves(nn.unbox(abstract))]
    # the stacked layer axis has the logical name "layers" (rules.py maps it to no mesh axis)
    spec = nn.get_partition_spec(abstract)["blocks"]["attn"]["query"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "heads", "kv")
    assert nn.get_partition_spec(stacked)["blocks"]["attn"]["query"]["kernel"] == spec
    np.testing.assert_array_equal(nn.unbox(stacked)["blocks"]["ls2"][2], nn.unbox(unrolled_params)["blocks_2"]["ls2"])
    _close(layout.unstack_layers(stacked), unrolled_params, rtol=0, atol=0)
    assert layout.layer_count(stacked) == layout.layer_count(unrolled_params) == 3
    # a merge by path brings the source to the target's layout, both ways
    plain = jax.tree.map(np.asarray, nn.unbox(unrolled_params))
    merged, skipped = merge_params(nn.unbox(abstract), plain)
    assert not skipped
    _close(merged, layout.stack_layers(plain), rtol=0, atol=0)
    back, skipped = merge_params(plain, layout.stack_layers(plain))
    assert not skipped
    _close(back, plain, rtol=0, atol=0)


def test_auto_scan_and_switches():
    assert not S.resolve_scan(None, 11) and S.resolve_scan(None, 12) and S.resolve_scan("auto", 24)
    assert S.resolve_scan("true", 2) and not S.resolve_scan("false", 24) and S.resolve_scan(True, 1)
    assert [S.resolve_remat(x) for x in (False, True, "none", "full", "dots_saveable", "true")] == [
        "none", "full", "none", "full", "dots_saveable", "full"]
    with pytest.raises(ValueError, match="remat"):
        S.resolve_remat("everything")
    with pytest.raises(ValueError, match="scan"):
        S.resolve_scan("maybe", 3)
    deep = ViTEncoder(image_size=8, patch_size=8, width=8, depth=12, num_heads=2)
    params = jax.eval_shape(deep.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert "blocks" in params and params["blocks"]["norm1"]["scale"].value.shape == (12, 8)


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_scanned_matches_unrolled_values_and_gradients(unrolled_params, reference, remat):
    unrolled, scanned = ViTEncoder(**KW, scan=False, remat=remat), ViTEncoder(**KW, scan=True, remat=remat)
    stacked = layout.stack_layers(unrolled_params)
    a, ga = jax.jit(jax.value_and_grad(lambda p: _loss(unrolled, p)))(unrolled_params)
    b, gb = jax.jit(jax.value_and_grad(lambda p: _loss(scanned, p)))(stacked)
    np.testing.assert_allclose(a, reference[0], rtol=1e-6)
    np.testing.assert_allclose(b, reference[0], rtol=1e-6)
    _close(ga, reference[1], rtol=1e-4, atol=1e-7)
    _close(layout.unstack_layers(gb), reference[1], rtol=1e-4, atol=1e-7)


def test_drop_path_schedule_is_scanned():
    """A linear drop-path schedule (a per-layer value) runs scanned: eval mode agrees exactly, train mode
    keeps the expectation (rate 0 in block 0, drops elsewhere)."""
    kw = dict(KW, drop_path=0.5)
    unrolled, scanned = ViTEncoder(**kw, scan=False), ViTEncoder(**kw, scan=True)
    params = jax.jit(unrolled.init)(jax.random.key(4), IMAGES)["params"]
    assert unrolled.drop_path_rates() == [0.0, 0.25, 0.5]
    stacked = layout.stack_layers(params)
    evaluated = _jit_loss(scanned, stacked, False)
    np.testing.assert_allclose(evaluated, _jit_loss(unrolled, params, False), rtol=1e-6)
    trained = [float(_jit_loss(scanned, stacked, True)) for _ in range(1)]
    assert np.isfinite(trained).all() and trained[0] != pytest.approx(float(evaluated), abs=1e-6)


def test_hidden_states_and_intermediate_layers(unrolled_params):
    unrolled, scanned = ViTEncoder(**KW, scan=False), ViTEncoder(**KW, scan=True)
    stacked = layout.stack_layers(unrolled_params)
    z0 = unrolled.apply({"params": unrolled_params}, IMAGES, method=ViTEncoder.embed)
    h_u = unrolled.apply({"params": unrolled_params}, z0, method=ViTEncoder.hidden_states)
    h_s = scanned.apply({"params": stacked}, z0, method=ViTEncoder.hidden_states)
    assert h_u.shape == (3, 2, 5, 16)
    np.testing.assert_allclose(h_s, h_u, rtol=1e-5, atol=1e-6)
    last = scanned.apply({"params": stacked}, IMAGES, 2, method=ViTEncoder.intermediate_layers)
    np.testing.assert_allclose(last[-1], unrolled.apply({"params": unrolled_params}, IMAGES), rtol=1e-5, atol=1e-5)


def _dense_np(p, x):
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


@pytest.mark.parametrize("act", ["swiglu", "quick_gelu", "gelu"])
def test_mlp_variants_match_their_formulas(act):
    x = np.random.default_rng(5).normal(size=(2, 3, 8)).astype(np.float32)
    mlp = T.Mlp(6, act, bias_std=0.1)
    p = nn.unbox(mlp.init(jax.random.key(6), x))["params"]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    if act == "swiglu":  # Shazeer 2020 Eq. 6: (silu(x W) * (x V)) W2, W and V fused in w12 (gate first)
        assert p["w12"]["kernel"].shape == (8, 12) and p["w3"]["kernel"].shape == (6, 8)
        gate, value = np.split(_dense_np(p["w12"], x), 2, axis=-1)
        expected = _dense_np(p["w3"], gate * sigmoid(gate) * value)
    else:
        h = _dense_np(p["fc1"], x)
        h = h * sigmoid(1.702 * h) if act == "quick_gelu" else 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        expected = _dense_np(p["fc2"], h)
    np.testing.assert_allclose(mlp.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-6)


def _ln(x, p, eps):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


@pytest.mark.parametrize("pre_norm", [True, False])
def test_layer_scale_and_norm_placement(pre_norm):
    """Pre-norm x + ls1 * attn(LN(x)), x + ls2 * mlp(LN(x)); post-norm LN(x + attn(x)), LN(x + mlp(x))."""
    x = np.random.default_rng(7).normal(size=(2, 4, 8)).astype(np.float32)
    block = T.TransformerBlock(2, 2.0, layerscale_init=0.3, pre_norm=pre_norm, layer_norm_eps=1e-5)
    p = jax.tree.map(np.asarray, nn.unbox(block.init(jax.random.key(8), x))["params"])
    p["ls1"], p["ls2"] = np.linspace(0.1, 0.8, 8, dtype=np.float32), np.linspace(-1, 1, 8, dtype=np.float32)
    attn = lambda y: np.asarray(T.MultiHeadAttention(2).apply({"params": p["attn"]}, y))  # noqa: E731
    mlp = lambda y: np.asarray(T.Mlp(16).apply({"params": p["mlp"]}, y))  # noqa: E731
    if pre_norm:
        h = x + p["ls1"] * attn(_ln(x, p["norm1"], 1e-5))
        expected = h + p["ls2"] * mlp(_ln(h, p["norm2"], 1e-5))
    else:
        h = _ln(x + p["ls1"] * attn(x), p["norm1"], 1e-5)
        expected = _ln(h + p["ls2"] * mlp(h), p["norm2"], 1e-5)
    np.testing.assert_allclose(block.apply({"params": p}, x), expected, rtol=1e-4, atol=1e-5)


def test_head_size_bias_free_qkv_mask_and_mlp_dropout():
    """ViSD's VQ-VAE layer options (medjax.models.visd_vqvae.vae_layer): heads x head_dim other than the width,
    q/k/v without bias (the output keeps its), a key mask, and dropout on the MLP's hidden activations only
    (rate 1 leaves fc2's bias as the whole MLP output)."""
    x = np.random.default_rng(11).normal(size=(2, 4, 8)).astype(np.float32)
    mask = np.asarray([True, True, False, True])[None, None, None]
    block = T.TransformerBlock(2, head_dim=3, mlp_dim=5, qkv_bias=False, mlp_dropout=1.0, mlp_bias_std=0.1,
                               layer_norm_eps=1e-5, fused_attention=False)
    p = jax.tree.map(np.asarray, nn.unbox(jax.jit(block.init)(jax.random.key(12), x))["params"])
    assert {k: set(v) for k, v in p["attn"].items()} == {"query": {"kernel"}, "key": {"kernel"}, "value": {"kernel"},
                                                         "out": {"kernel", "bias"}}
    assert p["attn"]["query"]["kernel"].shape == (8, 2, 3) and p["attn"]["out"]["kernel"].shape == (2, 3, 8)
    h = _ln(x, p["norm1"], 1e-5)
    q, k, v = (np.einsum("btw,whd->bthd", h, p["attn"][n]["kernel"]) for n in ("query", "key", "value"))
    logits = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(3), -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v)
    h = x + np.einsum("bqhd,hdw->bqw", attended, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
    hidden = _ln(h, p["norm2"], 1e-5) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    mlp = hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    both = jax.jit(lambda p: (block.apply({"params": p}, x, mask=mask), block.apply(  # one compile
        {"params": p}, x, mask=mask, train=True, rngs={"dropout": jax.random.key(13)})))
    plain, dropped = both(p)
    np.testing.assert_allclose(plain, h + mlp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dropped, h + p["mlp"]["fc2"]["bias"], rtol=1e-4, atol=1e-5)


def test_fused_attention_matches_the_explicit_softmax():
    rs = np.random.default_rng(9)
    x, kv = rs.normal(size=(2, 5, 8)).astype(np.float32), rs.normal(size=(2, 3, 8)).astype(np.float32)
    mask = rs.random((2, 1, 5, 3)) > 0.3
    mask[..., 0] = True  # every query attends somewhere
    fused, explicit = T.MultiHeadAttention(2), T.MultiHeadAttention(2, fused=False)
    variables = fused.init(jax.random.key(10), x, kv)
    for args in ((x, kv), (x, kv, mask), (x,)):
        np.testing.assert_allclose(fused.apply(variables, *args), explicit.apply(variables, *args),
                                   rtol=1e-5, atol=1e-6)
    # the explicit path is the definition
    q, k, v = (rs.normal(size=(2, 4, 2, 3)).astype(np.float32) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(3)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(T.softmax_attention(q, k, v), np.einsum("bhqk,bkhd->bqhd", weights, v),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tower", ["clip_text", "bert"])
def test_text_towers_scan_with_masks(tower):
    """CLIP text (pre-norm, causal + padding mask) and BERT (post-norm, padding mask) on the shared stack:
    scanned (params under `layers`) equals unrolled (`layers_{i}`)."""
    from medjax.nn.bert import BertEncoder
    from medjax.nn.clip_text import CLIPTextTransformer

    kw = dict(vocab_size=20, width=16, depth=2, num_heads=2, mlp_dim=24)
    cls = CLIPTextTransformer if tower == "clip_text" else BertEncoder
    kw |= dict(max_length=6) if tower == "clip_text" else dict(max_positions=6, add_pooling_layer=False)
    ids = np.array([[3, 5, 7, 19, 0, 0], [4, 4, 2, 8, 9, 19]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], np.int32)
    unrolled, scanned = cls(**kw), cls(**kw, scan=True)
    params = unrolled.init(jax.random.key(11), ids, mask)["params"]
    assert "layers_1" in params
    stacked = layout.stack_layers(params, "layers")
    assert jax.tree.structure(stacked) == jax.tree.structure(
        jax.eval_shape(scanned.init, jax.random.key(0), ids, mask)["params"])
    np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask),
                               unrolled.apply({"params": params}, ids, mask), rtol=1e-5, atol=1e-5)
