"""CLIP towers and the BERT encoder without torch: hand-computed pieces (bicubic weights, EOS rule, RoBERTa
positions, masks), causality / padding invariance, patch-embedding layout, logical axes and input errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.nn.bert import BertEncoder, roberta_position_ids
from medjax.nn.clip_text import CLIPTextTransformer, causal_padding_mask, clip_text_variant, eos_positions
from medjax.nn.clip_vit import (CLIPVisionTransformer, activation, bicubic_resize_matrix, clip_vision_variant,
                                resize_position_embedding)

AXES = {"embed", "mlp", "heads", "kv", "vocab", "patch", None}


def random_variables(module, *args, seed=0):
    """init's boxed tree filled with numpy normals (no per-shape RNG compiles)."""
    rs = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rs.normal(0, 0.3, s.shape), s.dtype), abstract)


def assert_logical_axes(variables):
    leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXES, leaf.names


def tiny_vision(**fields):
    return CLIPVisionTransformer(**{**dict(image_size=16, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=24),
                                    **fields})


def test_quick_gelu_and_activation_names():
    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(activation("quick_gelu")(x), np.array([-1.0, 0.0, 2.0]) / (
        1 + np.exp(-1.702 * np.array([-1.0, 0.0, 2.0]))), rtol=1e-6)
    np.testing.assert_allclose(activation("gelu")(jnp.array([1.0])), [0.8413447], rtol=1e-6)
    with pytest.raises(ValueError, match="clip_vit.py activation.*'swiglu'.*quick_gelu"):
        activation("swiglu")


def test_variant_tables():
    assert clip_vision_variant("B/16") == {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072,
                                           "patch_size": 16}
    assert clip_vision_variant("L/14")["depth"] == 24 and clip_text_variant("B/32")["width"] == 512
    assert clip_text_variant("L") == {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072}
    params = jax.eval_shape(lambda: CLIPVisionTransformer(**clip_vision_variant("B/16")).init(
        jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    # The parameter count of transformers CLIPVisionModel(patch_size=16): ViT-B/16 without projection.
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(nn.unbox(params))) == 85_799_424
    with pytest.raises(ValueError, match="clip_vision_variant"):
        clip_vision_variant("H/14")


def test_bicubic_matrix_matches_pytorch_weights_by_hand():
    # 4 -> 2: source x = 0.5, t = 0.5, taps at -1, 0, 1, 2 (the first clamped to 0), A = -0.75:
    # near(0.5) = 0.59375, far(1.5) = -0.09375.
    np.testing.assert_allclose(bicubic_resize_matrix(4, 2)[0], [0.5, 0.59375, -0.09375, 0.0])
    np.testing.assert_allclose(bicubic_resize_matrix(4, 2)[1], [0.0, -0.09375, 0.59375, 0.5])
    np.testing.assert_allclose(bicubic_resize_matrix(5, 5), np.eye(5))
    # 4 -> 8, output 3: source x = 1.25, t = 0.25: far(1.25), near(0.25), near(0.75), far(1.75).
    up = bicubic_resize_matrix(4, 8)
    np.testing.assert_allclose(up[3], [-0.10546875, 0.87890625, 0.26171875, -0.03515625])
    np.testing.assert_allclose(up.sum(1), 1.0)


def test_resize_position_embedding_keeps_class_position():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1 + 9, 4)), jnp.float32)
    assert resize_position_embedding(pos, (3, 3)) is pos
    resized = resize_position_embedding(pos, (2, 5))
    assert resized.shape == (11, 4)
    np.testing.assert_array_equal(resized[0], pos[0])
    grid = np.asarray(pos[1:]).reshape(3, 3, 4)
    expected = np.einsum("ri,ijd,cj->rcd", bicubic_resize_matrix(3, 2), grid, bicubic_resize_matrix(3, 5))
    np.testing.assert_allclose(resized[1:], expected.reshape(10, 4), atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        resize_position_embedding(pos[:8], (2, 2))


def test_clip_vision_shapes_axes_and_patch_layout():
    model = tiny_vision(projection_dim=8)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = random_variables(model, images)
    assert_logical_axes(variables)
    params = nn.unbox(variables["params"])
    assert params["patch_embed"]["kernel"].shape == (4 * 4 * 3, 16)
    assert params["position_embedding"].shape == (17, 16) and params["projection"]["kernel"].shape == (16, 8)

    @jax.jit
    def outputs(variables, images):
        tokens = model.apply(variables, images, method=model.embed)
        last = model.apply(variables, images)
        return tokens, last, model.apply(variables, images, method=model.image_embeds), model.apply(
            variables, method=model.class_token), model.apply(variables, images[:, :12, :8], method=model.embed)

    tokens, last, embeds, class_token, other_size = outputs(variables, images)
    assert last.shape == (2, 17, 16) and embeds.shape == (2, 8) and other_size.shape == (2, 1 + 3 * 2, 16)
    # The patch matmul is the bias-free conv (stride = kernel = patch) with kernel (p, q, c, width).
    kernel = np.asarray(params["patch_embed"]["kernel"]).reshape(4, 4, 3, 16)
    patches = np.asarray(images).reshape(2, 4, 4, 4, 4, 3)  # (b, row, p, col, q, c)
    conv = np.einsum("brpcqk,pqkw->brcw", patches, kernel).reshape(2, 16, 16)
    np.testing.assert_allclose(tokens[:, 1:], conv + params["position_embedding"][1:], atol=1e-5)
    np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(class_token, (2, 16)), atol=1e-6)
    np.testing.assert_allclose(class_token, params["class_embedding"] + params["position_embedding"][0], atol=1e-6)
    with pytest.raises(ValueError, match="clip_vit.py.*not a multiple of patch_size=4"):
        jax.eval_shape(model.apply, variables, images[:, :14])
    with pytest.raises(ValueError, match=r"clip_vit.py.*expected images \(batch, H, W, 3\)"):
        jax.eval_shape(model.apply, variables, images[..., :1])


def test_clip_vision_without_projection_has_no_projection_params():
    model = tiny_vision()
    variables = random_variables(model, jnp.zeros((1, 16, 16, 3)))
    assert "projection" not in variables["params"] and "ln_post" in variables["params"]
    with pytest.raises(ValueError, match="no projection"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 16, 16, 3)), method=model.image_embeds), variables)


def test_eos_rule_and_causal_mask_by_hand():
    ids = jnp.array([[0, 5, 9, 7, 1], [0, 9, 4, 9, 9]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 1])  # legacy: argmax of the ids
    np.testing.assert_array_equal(eos_positions(ids, 7), [3, 0])  # first EOS, 0 when absent
    np.testing.assert_array_equal(eos_positions(ids, 9), [2, 1])
    mask = causal_padding_mask(jnp.array([[1, 1, 0]]), 3)
    np.testing.assert_array_equal(mask[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert causal_padding_mask(None, 2).shape == (1, 1, 2, 2)


def test_clip_text_is_causal_and_projects():
    model = CLIPTextTransformer(vocab_size=20, width=16, depth=2, num_heads=2, mlp_dim=24, max_length=8,
                                eos_token_id=19, projection_dim=6)
    ids = jnp.array([[3, 4, 5, 19, 1, 1], [3, 7, 8, 9, 10, 19]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    variables = random_variables(model, ids)
    assert_logical_axes(variables)

    @jax.jit
    def outputs(variables, ids, mask):
        return (model.apply(variables, ids), model.apply(variables, ids.at[:, 4:].set(2)),
                model.apply(variables, ids, mask), model.apply(variables, ids, method=model.pooled_output),
                model.apply(variables, ids, method=model.text_embeds))

    out, changed, masked, pooled, embeds = outputs(variables, ids, mask)
    np.testing.assert_allclose(out[:, :4], changed[:, :4], atol=1e-6)  # later tokens never reach earlier ones
    assert not np.allclose(out[:, 4:], changed[:, 4:])
    # Padding keys are masked: with a mask, padded tails do not change the first 4 positions either.
    np.testing.assert_allclose(masked[0, :4], out[0, :4], atol=1e-6)
    np.testing.assert_allclose(pooled, out[jnp.arange(2), jnp.array([3, 5])], atol=1e-6)
    np.testing.assert_allclose(embeds, pooled @ nn.unbox(variables["params"])["projection"]["kernel"], atol=1e-5)
    with pytest.raises(ValueError, match="clip_text.py.*exceeds max_length=8"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="clip_text.py.*attention_mask shape"):
        jax.eval_shape(model.apply, variables, ids, mask[:, :3])


def test_roberta_positions_by_hand():
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 5, 1, 6, 2, 1]])
    np.testing.assert_array_equal(roberta_position_ids(ids, 1), [[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]])


@pytest.mark.parametrize("padding_idx", [None, 1])  # BERT and RoBERTa positions
def test_bert_padding_is_invisible_to_real_tokens(padding_idx):
    model = BertEncoder(vocab_size=30, width=16, depth=2, num_heads=2, mlp_dim=24, max_positions=16,
                        position_padding_idx=padding_idx)
    ids = jnp.array([[0, 7, 8, 9, 2]])
    padded_ids = jnp.concatenate([ids, jnp.ones((1, 3), ids.dtype)], axis=1)
    variables = random_variables(model, ids)
    assert_logical_axes(variables)
    assert nn.unbox(variables["params"])["pooler"]["kernel"].shape == (16, 16)

    @jax.jit
    def outputs(variables):
        return (model.apply(variables, ids),
                model.apply(variables, padded_ids, (padded_ids != 1).astype(jnp.int32)),
                model.apply(variables, ids, None, jnp.array([[0, 0, 1, 1, 1]])),
                model.apply(variables, ids, method=model.pooled_output))

    short, padded, types, pooled = outputs(variables)
    np.testing.assert_allclose(padded[:, :5], short, atol=1e-5)
    assert not np.allclose(types, short)
    pooler = nn.unbox(variables["params"])["pooler"]
    np.testing.assert_allclose(pooled, np.tanh(short[:, 0] @ pooler["kernel"] + pooler["bias"]), atol=1e-5)
    with pytest.raises(ValueError, match="bert.py.*attention_mask shape"):
        jax.eval_shape(model.apply, variables, ids, jnp.ones((1, 4)))


def test_bert_without_pooler_and_dropout_in_training():
    model = BertEncoder(vocab_size=30, width=16, depth=1, num_heads=2, mlp_dim=24, max_positions=8,
                        add_pooling_layer=False, hidden_dropout=0.5)
    ids = jnp.array([[1, 2, 3]])
    variables = random_variables(model, ids)
    assert "pooler" not in variables["params"]

    @jax.jit
    def outputs(variables):
        return model.apply(variables, ids), model.apply(variables, ids, train=True,
                                                         rngs={"dropout": jax.random.key(0)})

    eval_out, train_out = outputs(variables)
    assert train_out.shape == eval_out.shape and not np.allclose(train_out, eval_out)
    with pytest.raises(ValueError, match="no pooler"):
        jax.eval_shape(lambda v: model.apply(v, ids, method=model.pooled_output), variables)


def test_init_under_a_mesh_with_tensor_parallel_rules():
    """Every param's logical names fit its value at init time (sharding constraints under a mesh)."""
    from jax.sharding import Mesh, PartitionSpec

    from medjax.parallel.rules import logical_rules

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    cases = [(tiny_vision(projection_dim=8), jnp.zeros((2, 16, 16, 3))),
             (CLIPTextTransformer(vocab_size=20, width=16, depth=1, num_heads=2, mlp_dim=24, max_length=8,
                                  projection_dim=6), jnp.zeros((2, 4), jnp.int32)),
             (BertEncoder(vocab_size=30, width=16, depth=1, num_heads=2, mlp_dim=24, max_positions=8),
              jnp.zeros((2, 4), jnp.int32))]
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules("fsdp_tp")):
        for model, inputs in cases:
            abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)
            layer = nn.get_partition_spec(abstract)["params"]["layers_0"]
            attention = layer["attn"] if "attn" in layer else layer["attention"]
            assert attention["query"]["kernel"] == PartitionSpec("embed", "heads", "kv")
            assert attention["out"]["kernel"] == PartitionSpec("heads", "kv", "embed")
