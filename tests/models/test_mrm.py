"""MRM (Yang et al., ICCV 2023) on a tiny config: outputs, wiring of the relation-masking blocks,
gradients, determinism, sharding annotations, config parsing and transfer to ViTClassifier."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax.losses.mrm import mrm_loss
from medjax.models.mrm import MRM, GenomeTokenizer, mrm_from_config
from medjax.models.vit_classifier import ViTClassifier
from medjax.nn.vit import EncoderBlock, ViTEncoder
from medjax.parallel.rules import logical_rules

TINY = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_ratio=2.0, num_snps=50,
            genome_token_size=16, genome_width=24, genome_heads=2, snn_layers=2, snn_dropout=0.1,
            decoder_width=32, decoder_depth=1, decoder_heads=2, genome_decoder_depth=1,
            tau_image=0.5, tau_genome=0.5, tau_cross=0.5, drop_path=0.1, kernel_impl="reference")
ENCODER = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_ratio=2.0)  # one block: compile time
BATCH = 3


def is_box(x):
    return isinstance(x, nn.Partitioned)


def compile_fast(fn, *args):
    """jit at XLA backend optimisation level 0: halves this tiny model's CPU compile time."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny():
    """The tiny MRM with its init's param tree and logical boxes, filled with numpy normals (init is
    traced by eval_shape; compiling the real initialisers would dominate the test time)."""
    rs = np.random.default_rng(0)
    images = rs.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    genome = rs.integers(0, 3, size=(BATCH, 50)).astype(np.float32)
    model = MRM(**TINY)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), images, genome, train=False))
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rs.normal(0, 0.2, s.shape), s.dtype), abstract)
    return model, images, genome, variables


@pytest.fixture(scope="module")
def eval_forward(tiny):
    """Eval forward that also records every submodule method's output (for the wiring tests)."""
    model, images, genome, variables = tiny
    forward = lambda v: model.apply(v, images, genome, train=False,  # noqa: E731
                                    capture_intermediates=lambda mdl, method: True)
    return compile_fast(forward, variables)(variables)


@pytest.fixture(scope="module")
def by_hand(tiny, eval_forward):
    """The paper's steps recomputed from standalone modules on MRM's params and recorded inputs."""
    _, images, _, variables = tiny
    seen = eval_forward[1]["intermediates"]
    inputs = {"z_i0": seen["image_encoder"]["embed"][0], "z_g0": seen["genome_tokenizer"]["__call__"][0],
              "z_i_s": seen["image_self_mask"]["__call__"][0], "z_g_s": seen["genome_self_mask"]["__call__"][0],
              "z_i_c": seen["image_cross_mask"]["__call__"][0]}

    def steps(params, x):
        block = lambda name, ratio, *a: EncoderBlock(2, 2.0, relation_mask_ratio=ratio,  # noqa: E731
                                                    kernel_impl="reference").apply({"params": params[name]}, *a)
        encoder = ViTEncoder(**ENCODER)
        return {
            "tokens": encoder.apply({"params": params["image_encoder"]}, images),
            "z_i_m": encoder.apply({"params": params["image_encoder"]}, x["z_i_c"], method=ViTEncoder.encode),
            "z_i_s": block("image_self_mask", 0.5, x["z_i0"]),
            "z_g_s": block("genome_self_mask", 0.5, x["z_g0"]),
            "z_i_c": block("image_cross_mask", 0.5, x["z_i_s"], x["z_g_s"]),
            "z_g_c": block("genome_cross_mask", 0.5, x["z_g_s"], x["z_i_s"]),
            "z_i_s_tau0": block("image_self_mask", 0.0, x["z_i0"]),
            "z_i_s_k0": block("image_self_mask", 0.01, x["z_i0"]),  # k = floor(0.01 * 17) = 0
        }

    params = nn.unbox(variables["params"])
    return compile_fast(steps, params, inputs)(params, inputs)


@pytest.fixture(scope="module")
def loss_and_grad(tiny):
    model, images, genome, variables = tiny

    def objective(params, rng):
        outputs = model.apply({"params": params}, images, genome, train=True, rngs={"dropout": rng})
        return mrm_loss(outputs, images, genome, patch_size=8, lam=1.0, norm_pix_loss=True)

    return compile_fast(jax.value_and_grad(objective, has_aux=True), nn.unbox(variables["params"]), jax.random.key(0))


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_output_shapes_and_unmasked_path_is_the_plain_encoder(eval_forward, by_hand):
    outputs, _ = eval_forward
    assert outputs["image_pred"].shape == (BATCH, 16, 8 * 8 * 3)
    assert outputs["genome_pred"].shape == (BATCH, 50)
    for key in ("image_pooled", "image_masked_pooled", "genome_pooled", "genome_masked_pooled"):
        assert outputs[key].shape == (BATCH, 32), key  # genome pooled features are mapped to the image width
        assert np.all(np.isfinite(np.asarray(outputs[key])))
    close(outputs["image_pooled"], by_hand["tokens"][:, 1:].mean(1))
    close(outputs["image_masked_pooled"], by_hand["z_i_m"][:, 1:].mean(1))
    assert not np.allclose(np.asarray(outputs["image_pooled"]), np.asarray(outputs["image_masked_pooled"]), atol=1e-3)


def test_relation_masking_blocks_are_wired_as_in_the_paper(eval_forward, by_hand):
    """Sec. 3.2.1-3.2.2: z^S from z^0 (ratio tau), z^C from (z_I^S, z_G^S), z_{I,M} = same encoder on z_I^C."""
    seen = eval_forward[1]["intermediates"]
    close(by_hand["z_i_s"], seen["image_self_mask"]["__call__"][0])
    close(by_hand["z_g_s"], seen["genome_self_mask"]["__call__"][0])
    close(by_hand["z_i_c"], seen["image_cross_mask"]["__call__"][0])
    close(by_hand["z_g_c"], seen["genome_cross_mask"]["__call__"][0])
    # The masked path reuses the image encoder's blocks (one param tree) on z_I^C.
    assert len(seen["image_encoder"]["encode"]) == 2
    close(by_hand["z_i_m"], seen["image_encoder"]["encode"][1])
    # tau = 0 self-masking is plain attention: the relation-masked path with k = 0 equals it, tau 0.5 does not.
    np.testing.assert_allclose(np.asarray(by_hand["z_i_s_k0"]), np.asarray(by_hand["z_i_s_tau0"]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(by_hand["z_i_s_tau0"]) - np.asarray(by_hand["z_i_s"])).max() > 1e-3


def test_loss_is_finite_and_every_parameter_gets_gradient(tiny, loss_and_grad):
    _, _, _, variables = tiny
    params = nn.unbox(variables["params"])
    (loss, parts), grads = loss_and_grad(params, jax.random.key(2))
    assert np.isfinite(float(loss))
    for name in ("recon_image", "recon_genome", "self_matching", "cross_matching"):
        assert np.isfinite(float(parts[name])) and float(parts[name]) > 0, name
    np.testing.assert_allclose(float(loss), sum(float(v) for v in parts.values()), rtol=1e-5)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        assert np.abs(grad).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_deterministic_given_rngs(tiny, loss_and_grad):
    _, _, _, variables = tiny
    params = nn.unbox(variables["params"])
    (loss_a, _), grads_a = loss_and_grad(params, jax.random.key(3))
    (loss_b, _), grads_b = loss_and_grad(params, jax.random.key(3))
    (loss_c, _), _ = loss_and_grad(params, jax.random.key(4))
    assert float(loss_a) == float(loss_b)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads_a, grads_b)
    assert float(loss_a) != float(loss_c)  # SNN alpha dropout and drop path use the 'dropout' rng


def test_every_parameter_has_logical_axes(tiny):
    _, _, _, variables = tiny
    leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=is_box)
    assert leaves and all(is_box(leaf) for leaf in leaves)
    specs = nn.get_partition_spec(variables)["params"]
    for path, spec in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert any(axis is not None for axis in spec), jax.tree_util.keystr(path)
    assert tuple(specs["genome_tokenizer"]["proj"]["kernel"]) == ("snps", "embed")
    assert tuple(specs["image_decoder"]["pred"]["kernel"]) == ("embed", "patch")
    assert tuple(specs["genome_decoder"]["pred"]["kernel"]) == ("embed", "snps")


def test_genome_tokenizer_pads_and_projects():
    genome = np.random.default_rng(6).integers(0, 3, size=(2, 50)).astype(np.float32)
    tokenizer = GenomeTokenizer(num_snps=50, token_size=16, width=8)
    abstract = jax.eval_shape(lambda: tokenizer.init(jax.random.key(0), genome))
    rs = np.random.default_rng(7)
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rs.normal(size=s.shape), s.dtype), abstract)
    p = jax.tree_util.tree_map(np.asarray, nn.unbox(variables["params"]))
    tokens = np.concatenate([genome, np.zeros((2, 14), np.float32)], 1).reshape(2, 4, 16)
    expected = tokens @ p["proj"]["kernel"] + p["proj"]["bias"] + p["pos_embed"]
    np.testing.assert_allclose(np.asarray(tokenizer.apply(variables, genome)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GenomeTokenizer"):
        tokenizer.apply(variables, genome[:, :49])


def test_fields_and_inputs_are_checked():
    images, genome = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 50))
    init = lambda model, x, g: jax.eval_shape(lambda: model.init(jax.random.key(0), x, g, train=False))  # noqa: E731
    with pytest.raises(ValueError, match="impl"):
        init(MRM(**{**TINY, "kernel_impl": "bogus"}), images, genome)
    with pytest.raises(ValueError, match="ViTEncoder.embed"):
        init(MRM(**TINY), jnp.zeros((2, 24, 24, 3)), genome)
    with pytest.raises(ValueError, match="num_snps=50"):
        init(MRM(**TINY), images, jnp.zeros((2, 49)))
    with pytest.raises(ValueError, match="MRM.tau_cross"):
        init(MRM(**{**TINY, "tau_cross": 1.0}), images, genome)
    bf16 = MRM(**{**TINY, "dtype": jnp.bfloat16})
    abstract = init(bf16, images, genome)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {np.dtype(np.float32)}
    outputs = jax.eval_shape(lambda v: bf16.apply(v, images, genome, train=False), abstract)
    assert {o.dtype for o in outputs.values()} == {np.dtype(np.float32)}


def test_mrm_from_config():
    cfg = ml_collections.ConfigDict({**{k: v for k, v in TINY.items() if k != "num_snps"},
                                     "lam": 1.0, "norm_pix_loss": True, "dtype": "bfloat16", "param_dtype": "float32"})
    model = mrm_from_config(cfg, num_snps=50)
    assert model.num_snps == 50 and model.genome_width == 24 and model.tau_cross == 0.5
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    cfg.unlock()
    cfg.dtype = "fp8"
    with pytest.raises(ValueError, match="model.dtype"):
        mrm_from_config(cfg, num_snps=50)
    with pytest.raises(ValueError, match="unknown model key"):
        mrm_from_config({"widht": 32}, num_snps=50)
    with pytest.raises(ValueError, match="num_snps"):
        mrm_from_config({"num_snps": 40}, num_snps=50)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pretrained_encoder_transfers_to_vit_classifier(tiny, by_hand, pooling):
    _, images, _, variables = tiny
    classifier = ViTClassifier(num_classes=5, pooling=pooling, **ENCODER)
    abstract = jax.eval_shape(lambda: classifier.init(jax.random.key(0), images, train=False))["params"]
    pretrained = nn.unbox(variables["params"]["image_encoder"])
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, nn.unbox(tree))  # noqa: E731
    assert shapes(abstract["encoder"]) == shapes(pretrained)
    rs = np.random.default_rng(8)
    params = {**jax.tree_util.tree_map(lambda s: rs.normal(size=s.shape).astype(np.float32), nn.unbox(abstract)),
              "encoder": pretrained}
    logits = compile_fast(lambda p: classifier.apply({"params": p}, images, train=False), params)(params)
    tokens = np.asarray(by_hand["tokens"], np.float64)  # ViTEncoder on MRM's image_encoder params
    if pooling == "mean":
        feature = tokens[:, 1:].mean(1)
        feature = (feature - feature.mean(-1, keepdims=True)) / np.sqrt(feature.var(-1, keepdims=True) + 1e-6)
        feature = feature * params["fc_norm"]["scale"] + params["fc_norm"]["bias"]
    else:
        feature = tokens[:, 0]
    expected = feature @ params["head"]["kernel"] + params["head"]["bias"]
    assert logits.shape == (BATCH, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_traces_under_a_mesh_with_logical_rules():
    """Every param's logical names fit its rank: init and apply trace under a mesh + rules."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    images, genome = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 50))
    model, classifier = MRM(**TINY), ViTClassifier(num_classes=3, **ENCODER)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules("fsdp_tp")):
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, genome, train=False))
        outputs = jax.eval_shape(lambda v: model.apply(v, images, genome, train=True,
                                                       rngs={"dropout": jax.random.key(1)}), abstract)
        abstract = jax.eval_shape(lambda: classifier.init(jax.random.key(0), images, train=False))
        logits = jax.eval_shape(lambda v: classifier.apply(v, images, train=False), abstract)
    assert outputs["genome_pred"].shape == (2, 50) and logits.shape == (2, 3)
