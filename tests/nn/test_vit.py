"""ViT building blocks: patchify order, attention math (plain and relation-masked), blocks, encoder."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.nn.attention import MultiHeadAttention
from medjax.nn.vit import DropPath, EncoderBlock, PatchEmbed, ViTEncoder, patchify, unpatchify, vit_variant


def numpy_attention(x_q, x_kv, params, ratio=0.0):
    """softmax(QK^T/sqrt(d)) per head, top floor(ratio*kv) relations per row zeroed, times V, out proj."""
    proj = lambda x, p: np.einsum("btd,dhk->bthk", x, p["kernel"]) + p["bias"]  # noqa: E731
    q, k, v = proj(x_q, params["query"]), proj(x_kv, params["key"]), proj(x_kv, params["value"])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = math.floor(ratio * k.shape[1])
    if top:
        kth_largest = np.sort(probs, axis=-1)[..., -top][..., None]
        probs = np.where(probs >= kth_largest, 0.0, probs)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return np.einsum("bqhd,hde->bqe", out, params["out"]["kernel"]) + params["out"]["bias"]


def numpy_params(variables):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))


def random_variables(module, *args, seed=0, **kwargs):
    """Variables with init's tree and logical boxes, filled with numpy normals (no per-shape RNG compiles)."""
    rs = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rs.normal(0, 0.3, s.shape), s.dtype), abstract)


def test_patchify_matches_mae_order_and_round_trips():
    images = np.random.default_rng(0).normal(size=(2, 4, 6, 3)).astype(np.float32)
    x = np.transpose(images, (0, 3, 1, 2)).reshape(2, 3, 2, 2, 3, 2)  # MAE: (n, c, h, p, w, q)
    expected = np.einsum("nchpwq->nhwpqc", x).reshape(2, 6, 12)
    patches = patchify(images, 2)
    np.testing.assert_array_equal(np.asarray(patches), expected)
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, 2, grid=(2, 3))), images)
    square = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(square, 4), 4)), square)
    with pytest.raises(ValueError, match="vit.py patchify"):
        patchify(images, 4)


def test_vit_variant_table():
    assert vit_variant("B") == {"width": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}
    assert vit_variant("L/16") == {"width": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "patch_size": 16}
    assert [vit_variant(n)["width"] for n in ("Ti", "S", "H")] == [192, 384, 1280]
    assert vit_variant("H/14")["depth"] == 32
    with pytest.raises(ValueError, match="vit_variant"):
        vit_variant("X/16")


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_cross_attention_matches_numpy(ratio):
    rs = np.random.default_rng(2)
    x_q, x_kv = rs.normal(size=(2, 5, 8)).astype(np.float32), rs.normal(size=(2, 6, 12)).astype(np.float32)
    attn = MultiHeadAttention(num_heads=2, relation_mask_ratio=ratio, kernel_impl="reference")
    variables = random_variables(attn, x_q, x_kv, seed=3)
    got = attn.apply(variables, x_q, x_kv)
    assert got.shape == (2, 5, 8)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(x_q, x_kv, numpy_params(variables), ratio),
                               rtol=1e-4, atol=1e-5)


def test_masked_path_with_no_masked_relation_equals_plain_attention():
    x = np.random.default_rng(4).normal(size=(2, 7, 8)).astype(np.float32)
    variables = random_variables(MultiHeadAttention(num_heads=2), x, seed=5)
    plain = MultiHeadAttention(num_heads=2).apply(variables, x)
    through_dispatcher = MultiHeadAttention(num_heads=2, relation_mask_ratio=0.1).apply(variables, x)  # k = 0
    masked = MultiHeadAttention(num_heads=2, relation_mask_ratio=0.3).apply(variables, x)  # k = 2
    np.testing.assert_allclose(np.asarray(through_dispatcher), np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(masked) - np.asarray(plain)).max() > 1e-3
    with pytest.raises(ValueError, match="impl"):
        MultiHeadAttention(num_heads=2, relation_mask_ratio=0.3, kernel_impl="bogus").apply(variables, x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")


def test_layer_scale_zero_makes_the_block_an_identity_and_drop_path():
    x = np.random.default_rng(6).normal(size=(3, 5, 8)).astype(np.float32)
    block = EncoderBlock(num_heads=2, layerscale_init=1e-5)
    variables = random_variables(block, x, seed=7)
    assert tuple(nn.get_partition_spec(variables)["params"]["ls1"]) == ("embed",)
    variables["params"]["ls1"] = variables["params"]["ls1"].replace_boxed(jnp.zeros(8))
    variables["params"]["ls2"] = variables["params"]["ls2"].replace_boxed(jnp.zeros(8))
    np.testing.assert_array_equal(np.asarray(block.apply(variables, x)), x)  # zero LayerScale: identity block
    ones = jnp.ones((4000, 2, 3))
    dropped = np.asarray(DropPath(0.25).apply({}, ones, train=True, rngs={"dropout": jax.random.key(8)}))
    per_sample = dropped[:, 0, 0]
    assert set(np.unique(dropped)) == {0.0, np.float32(1.0 / 0.75)}
    assert (dropped == per_sample[:, None, None]).all()  # one decision per sample
    assert (per_sample == 0).mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_array_equal(np.asarray(DropPath(0.25).apply({}, ones, train=False)), np.asarray(ones))


def test_encoder_block_is_pre_norm_attention_then_mlp():
    rs = np.random.default_rng(9)
    x, kv = rs.normal(size=(2, 4, 8)).astype(np.float32), rs.normal(size=(2, 3, 8)).astype(np.float32)
    block = EncoderBlock(num_heads=2, mlp_ratio=2.0, relation_mask_ratio=0.4, kernel_impl="reference")
    variables = random_variables(block, x, kv, seed=10)
    p = numpy_params(variables)

    def layer_norm(y, q):
        return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6) * q["scale"] + q["bias"]

    h = x + numpy_attention(layer_norm(x, p["norm1"]), layer_norm(kv, p["norm_kv"]), p["attn"], ratio=0.4)
    hidden = layer_norm(h, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    expected = h + hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    np.testing.assert_allclose(np.asarray(block.apply(variables, x, kv)), expected, rtol=1e-4, atol=1e-5)


def test_vit_encoder_embed_encode_and_partition_specs():
    encoder = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, num_heads=2)
    images = np.random.default_rng(11).normal(size=(2, 16, 16, 3)).astype(np.float32)
    # Real init, jitted with an rbg key: threefry's per-shape compiles dominate CPU test time.
    variables = jax.jit(lambda x: encoder.init(jax.random.key(12, impl="rbg"), x))(images)
    tokens = encoder.apply(variables, images)
    assert tokens.shape == (2, 17, 16)
    np.testing.assert_allclose(np.asarray(tokens).mean(-1), 0.0, atol=1e-5)  # final LayerNorm at init
    z0 = encoder.apply(variables, images, method=ViTEncoder.embed)
    np.testing.assert_allclose(np.asarray(encoder.apply(variables, z0, method=ViTEncoder.encode)), np.asarray(tokens),
                               rtol=1e-6, atol=1e-6)
    # The conv patch embedding is a Dense on MAE-ordered patches.
    p = numpy_params(variables)
    proj = p["patch_embed"]["proj"]
    patches = patchify(images, 4) @ proj["kernel"].reshape(48, 16) + proj["bias"]
    expected_z0 = np.concatenate([np.broadcast_to(p["cls_token"], (2, 1, 16)), patches], 1) + p["pos_embed"]
    np.testing.assert_allclose(np.asarray(z0), expected_z0, rtol=1e-5, atol=1e-5)
    boxed = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in boxed)
    for path, spec in jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(variables),
                                                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert any(name is not None for name in spec), jax.tree_util.keystr(path)
    with pytest.raises(ValueError, match="ViTEncoder.embed"):
        encoder.apply(variables, images[:, :8])


def test_patch_embed_without_class_token():
    encoder = ViTEncoder(image_size=8, patch_size=4, width=8, depth=0, num_heads=2, class_token=False)
    variables = jax.eval_shape(lambda: encoder.init(jax.random.key(13), jnp.zeros((1, 8, 8, 3))))
    assert "cls_token" not in variables["params"]
    assert jax.eval_shape(lambda v: encoder.apply(v, jnp.zeros((1, 8, 8, 3))), variables).shape == (1, 4, 8)
    embed = jax.eval_shape(lambda: PatchEmbed(4, 8).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert embed["params"]["proj"]["kernel"].value.shape == (4, 4, 3, 8)


def test_attention_traces_under_a_mesh_with_logical_rules():
    """The 3-axis q/k/v/out kernels keep their logical names through init under a mesh (nn.DenseGeneral
    would constrain its flattened 2-D init value with the 3 names and fail)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    rules = (("batch", "data"), ("length", None), ("embed", "fsdp"), ("heads", "tensor"), ("kv", None),
             ("mlp", "tensor"))
    x = jnp.zeros((2, 5, 8))
    block = EncoderBlock(num_heads=2, relation_mask_ratio=0.4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(lambda: block.init(jax.random.key(0), x, x[:, :3]))
        out = jax.eval_shape(lambda v: block.apply(v, x, x[:, :3]), abstract)
    assert out.shape == (2, 5, 8)
    assert abstract["params"]["attn"]["query"]["kernel"].value.shape == (8, 2, 4)
