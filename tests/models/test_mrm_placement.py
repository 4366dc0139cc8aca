"""Where MRM's relation masking sits (medjax/models/mrm.py): the extra pre-norm block on the embeddings, masking
inside the image encoder's own attention layers (`mask_layers`), and the paper's literal z^S = R^M V
(`relation_output="literal"`), each against the numpy triple-loop reference of relation masking."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from medjax.models.mrm import MRM, RelationMaskedValues
from medjax.nn.vit import EncoderBlock, ViTEncoder
from tests.kernels.test_relation_mask_reference import numpy_relation_mask

TAU = 0.4


def np_layer_norm(x, p, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_heads(x, p):  # HeadsDense width -> (heads, head_dim)
    return np.einsum("btc,chd->bthd", x, p["kernel"]) + p["bias"]


def np_masked_block(x, p, ratio):
    """The pre-norm block: x + out(R^M V of LN1(x)), then + fc2(gelu(fc1(LN2(.)))), relation masking in numpy."""
    x = np.asarray(x, np.float64)
    h = np_layer_norm(x, p["norm1"])
    a = p["attn"]
    z = numpy_relation_mask(np_heads(h, a["query"]), np_heads(h, a["key"]), np_heads(h, a["value"]), ratio)
    x = x + np.einsum("bthd,hdc->btc", z, a["out"]["kernel"]) + a["out"]["bias"]
    h = np_layer_norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def params_of(module, *args, **kwargs):
    variables = module.init(jax.random.PRNGKey(0), *args, **kwargs)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(nn.unbox(variables["params"])))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).normal(size=(2, 7, 16)).astype(np.float32)


def test_extra_block_is_the_numpy_reference(tokens):
    block = EncoderBlock(2, relation_mask_ratio=TAU)
    params = params_of(block, tokens)
    out = block.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(out, np_masked_block(tokens, params, TAU), rtol=2e-4, atol=2e-4)


def test_masking_inside_the_encoders_own_layers(tokens):
    encoder = ViTEncoder(image_size=8, patch_size=4, width=16, depth=2, num_heads=2, scan=False)
    images = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    params = params_of(encoder, images)
    apply = lambda method, *a: encoder.apply({"params": params}, *a, method=method)  # noqa: E731
    z0 = apply(ViTEncoder.embed, jnp.asarray(images))
    masked = apply(lambda m, z: m.encode_relation_masked(z, TAU, [1]), z0)
    plain_first = apply(lambda m, z: m.hidden_states(z)[0], z0)  # layer 0 is not masked
    expected = np_layer_norm(np_masked_block(plain_first, params["blocks_1"], TAU), params["norm"])
    np.testing.assert_allclose(masked, expected, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(apply(lambda m, z: m.encode_relation_masked(z, TAU, []), z0), apply(ViTEncoder.encode, z0),
                               rtol=1e-6, atol=1e-6)  # no layer named: the plain encoder
    scanned = ViTEncoder(image_size=8, patch_size=4, width=16, depth=2, num_heads=2, scan=True)
    with pytest.raises(ValueError, match="scan=false"):
        jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), images,
                                            method=lambda m, x: m.encode_relation_masked(m.embed(x), TAU, [1])))


def test_literal_relation_output_is_r_m_v(tokens):
    genome = np.random.default_rng(2).normal(size=(2, 5, 12)).astype(np.float32)
    for x_kv in (None, genome):  # self- and cross-modality (other width and token count)
        module = RelationMaskedValues(2, TAU)
        params = params_of(module, tokens, x_kv)
        out = module.apply({"params": params}, jnp.asarray(tokens), x_kv)
        kv = np.asarray(tokens if x_kv is None else x_kv, np.float64)
        q = np_heads(np.asarray(tokens, np.float64), params["query"])
        expected = numpy_relation_mask(q, np_heads(kv, params["key"]), np_heads(kv, params["value"]), TAU)
        np.testing.assert_allclose(out, expected.reshape(2, 7, 16), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("fields, present, absent", [
    (dict(), ["image_self_mask"], []),
    (dict(mask_layers=(1,), scan=False), ["genome_self_mask"], ["image_self_mask"]),
    (dict(relation_output="literal"), ["image_self_mask/query"], ["image_self_mask/mlp", "image_self_mask/attn"]),
])
def test_mrm_placements_build(fields, present, absent):
    model = MRM(num_snps=40, image_size=16, patch_size=8, width=16, depth=2, num_heads=2, genome_token_size=8,
                genome_width=16, genome_heads=2, decoder_width=16, decoder_depth=1, decoder_heads=2,
                genome_decoder_depth=1, **fields)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                                               jnp.zeros((2, 40)), train=False))
    paths = {"/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]}
    for name in present:
        assert any(p.startswith(name) for p in paths), name
    for name in absent:
        assert not any(p.startswith(name) for p in paths), name
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 40)), train=False), shapes)
    assert out["image_pred"].shape == (2, 4, 8 * 8 * 3)
