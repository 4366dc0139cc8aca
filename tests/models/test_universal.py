"""The Universal Model's head (medjax.models.universal): shapes and param tree, the controller's
concat order and 153-way split against a numpy hand computation of the whole head on one voxel,
the frozen text embedding (zero gradient), and `embed-classes` against transformers' CLIP."""
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from medjax.convert import __main__ as convert_cli
from medjax.ontology import universal_classes as ct_templates
from medjax.losses.segmentation import partial_label_bce_dice
from medjax.models import universal

SIZE, C, C4 = 16, 16, 32  # volume edge; backbone head / pooled widths (divisible by the 4 groups used)


class StandInBackbone(nn.Module):
    """(dec4 (b, X/8, .., C4), out (b, X, .., C)) like the real backbones (which pool by 32), in two layers."""

    @nn.compact
    def __call__(self, x, *, train=False):
        out = nn.Conv(C, (3, 3, 3), name="conv")(x)
        dec4 = nn.Dense(C4, name="pool_proj")(nn.avg_pool(out, (8, 8, 8), (8, 8, 8)))
        return dec4, out


def _model(encoding):
    return universal.UniversalModel(backbone=StandInBackbone(), encoding=encoding, norm_groups=4)


@pytest.fixture(scope="module")
def setup():
    model = _model("word_embedding")
    x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, SIZE, 1))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))
    rng = np.random.default_rng(0)
    variables["constants"]["organ_embedding"] = jnp.asarray(rng.normal(0, 0.5, (32, 512)), jnp.float32)
    # non-trivial norms and biases so the hand computation sees every term
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), variables["params"])
    variables["params"] = params
    apply = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=lambda m, _: m.name == "backbone"))
    logits, state = apply(variables, x)
    return model, variables, x, logits, state["intermediates"]["backbone"]["__call__"][0]


def test_shapes_and_param_tree(setup):
    model, variables, x, logits, _ = setup
    assert logits.shape == (2, SIZE, SIZE, SIZE, 32) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    shapes = jax.tree.map(lambda a: a.shape, variables)
    assert shapes["constants"] == {"organ_embedding": (32, 512)}
    p = shapes["params"]
    assert set(p) == {"backbone", "GAP", "precls_conv", "controller", "text_to_vision"}
    assert p["GAP"] == {"norm": {"scale": (C4,), "bias": (C4,)}, "conv": {"kernel": (1, 1, 1, C4, 256), "bias": (256,)}}
    assert p["precls_conv"] == {"norm": {"scale": (C,), "bias": (C,)},
                                "conv": {"kernel": (1, 1, 1, C, 8), "bias": (8,)}}
    assert p["controller"] == {"kernel": (1, 1, 1, 512, 153), "bias": (153,)}
    assert p["text_to_vision"] == {"kernel": (512, 256), "bias": (256,)}
    rand = jax.eval_shape(_model("rand_embedding").init, jax.random.key(0), x)
    rand = jax.tree.map(lambda a: a.shape, nn.unbox(rand))
    assert set(rand) == {"params"} and rand["params"]["organ_embedding"] == (32, 256)
    assert "text_to_vision" not in rand["params"]


def test_full_swin_model_has_the_papers_param_count():
    """Backbone 62,186,610 + head 408,705 = 62,595,315 (the original, counted by running it); the frozen
    (32, 512) text embedding is a constant, not a param."""
    from medjax import config as config_lib

    model = universal.universal_from_config(config_lib.get_config("universal_swin", "full").model)
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 64, 1), jnp.float32))
    params = nn.unbox(variables["params"])
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(params["backbone"]) == 62_186_610 and count(params) == 62_595_315
    assert variables["constants"]["organ_embedding"].shape == (32, 512)


def _group_norm(x, scale, bias, groups, eps=1e-5):
    shape = x.shape
    g = x.reshape(shape[:-1] + (groups, shape[-1] // groups)).astype(np.float64)
    axes = tuple(range(g.ndim - 2)) + (g.ndim - 1,)
    g = (g - g.mean(axis=axes, keepdims=True)) / np.sqrt(g.var(axis=axes, keepdims=True) + eps)
    return g.reshape(shape) * scale + bias


def test_head_matches_hand_computation_on_one_voxel(setup):
    """GAP, text_to_vision, controller on concat[image, text] (image first) and the original's split of
    the 153 numbers: W1 = p[0:64] (8 out x 8 in), W2 = p[64:128], W3 = p[128:136], b1 = p[136:144],
    b2 = p[144:152], b3 = p[152]."""
    _, variables, _, logits, (dec4, out) = setup
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    emb = np.asarray(variables["constants"]["organ_embedding"], np.float64)
    b, voxel = 1, (5, 11, 14)
    gap = np.maximum(_group_norm(np.asarray(dec4[b]), p["GAP"]["norm"]["scale"], p["GAP"]["norm"]["bias"], 4), 0)
    image = gap.mean(axis=(0, 1, 2)) @ p["GAP"]["conv"]["kernel"][0, 0, 0] + p["GAP"]["conv"]["bias"]
    text = np.maximum(emb @ p["text_to_vision"]["kernel"] + p["text_to_vision"]["bias"], 0)
    pre = p["precls_conv"]
    feature = np.maximum(_group_norm(np.asarray(out[b]), pre["norm"]["scale"], pre["norm"]["bias"], 4), 0)
    x = feature[voxel] @ pre["conv"]["kernel"][0, 0, 0] + pre["conv"]["bias"]  # (8,)
    for k in (0, 7, 31):
        theta = np.concatenate([image, text[k]]) @ p["controller"]["kernel"][0, 0, 0] + p["controller"]["bias"]
        w1, w2, w3 = theta[0:64].reshape(8, 8), theta[64:128].reshape(8, 8), theta[128:136].reshape(1, 8)
        b1, b2, b3 = theta[136:144], theta[144:152], theta[152:153]
        h1 = np.maximum(w1 @ x + b1, 0)
        h2 = np.maximum(w2 @ h1 + b2, 0)
        want = (w3 @ h2 + b3)[0]
        np.testing.assert_allclose(float(logits[b, voxel[0], voxel[1], voxel[2], k]), want, rtol=1e-4, atol=1e-4)


def test_text_embedding_is_frozen(setup):
    model, variables, x, _, _ = setup
    labels = (jax.random.uniform(jax.random.key(3), (2, SIZE, SIZE, SIZE, 32)) < 0.3).astype(jnp.uint8)
    mask = jnp.ones((2, 32), bool)

    def loss(v):
        return partial_label_bce_dice(model.apply(v, x), labels, mask)[0]

    grads = jax.jit(jax.grad(loss))(variables)
    assert np.all(np.asarray(grads["constants"]["organ_embedding"]) == 0.0)
    assert np.abs(np.asarray(grads["params"]["text_to_vision"]["kernel"])).sum() > 0
    assert np.abs(np.asarray(grads["params"]["controller"]["kernel"])).sum() > 0


def test_missing_or_misshapen_embeddings_fail_clearly(setup):
    model, variables, x, _, _ = setup
    with pytest.raises(ValueError, match=r"word_embedding.*constants.*organ_embedding.*\(32, 512\)"):
        jax.eval_shape(lambda v: model.apply(v, x), {"params": variables["params"]})
    bad = {"params": variables["params"], "constants": {"organ_embedding": jnp.zeros((32, 256))}}
    with pytest.raises(ValueError, match=r"must be \(32, 512\), got \(32, 256\)"):
        jax.eval_shape(lambda v: model.apply(v, x), bad)
    with pytest.raises(ValueError, match="x must be"):
        jax.eval_shape(lambda v: model.apply(v, x[..., 0]), variables)


def test_load_class_embeddings_checks_the_file(tmp_path):
    good = tmp_path / "emb.npy"
    np.save(good, np.ones((32, 512), np.float64))
    array = universal.load_class_embeddings(str(good))
    assert array.shape == (32, 512) and array.dtype == np.float32
    np.save(tmp_path / "bad.npy", np.ones((31, 512), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npy.*\(32, 512\)"):
        universal.load_class_embeddings(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="missing.npy.*embed-classes"):
        universal.load_class_embeddings(str(tmp_path / "missing.npy"))


# ---- embed-classes -----------------------------------------------------------------------------------

def _tiny_clip_dir(directory):
    """A random CLIPModel and a character-level CLIP tokenizer saved as a Hugging Face directory."""
    vocab = {ch: i for i, ch in enumerate(string.ascii_lowercase)}
    vocab |= {ch + "</w>": 26 + i for i, ch in enumerate(string.ascii_lowercase)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=54, max_position_embeddings=64, bos_token_id=52, eos_token_id=53, pad_token_id=53),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_embed_classes_matches_transformers_get_text_features(tmp_path):
    ref, tokenizer = _tiny_clip_dir(tmp_path / "clip")
    prompts = universal.class_prompts()
    assert len(prompts) == 32 and prompts[7] == "A computerized tomography of a Arota"
    assert prompts[24] == "A computerized tomography of a Celiac Truck" and prompts == [
        ct_templates.PROMPT_TEMPLATE.format(n) for n in ct_templates.PROMPT_NAMES]
    out = tmp_path / "emb.npy"
    assert convert_cli.main(["embed-classes", "--clip", str(tmp_path / "clip"), "--out", str(out)]) == 0
    ours = np.load(out)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = ref.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    assert ours.shape == (32, 24) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # different prompts, different features
