"""UniMedI (He et al., ECCV 2024): attentive slice scores against a direct numpy computation from a tiny model's
attention maps, top-k order and ties, the pseudo-pair token layout and masks, the learned-temperature InfoNCE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.losses.contrastive import clip_contrastive_loss
from medjax.models import unimedi as unimedi_lib
from medjax.models.dinov2 import DINOHead
from medjax.nn.bert import BertEncoder

VOLUME, PATCH = (8, 32, 32), (2, 8, 8)  # 4 slabs of 4 x 4 patches


def tiny_model(scan: bool = False) -> unimedi_lib.UniMedI:
    vision = unimedi_lib.UniMedIVision(image_size=32, patch_size=8, volume_shape=VOLUME, volume_patch=PATCH, width=32,
                                       depth=2, num_heads=4, drop_path=0.0, scan=scan)
    text = BertEncoder(vocab_size=40, width=32, depth=1, num_heads=4, mlp_dim=64, max_positions=16,
                       add_pooling_layer=False)
    return unimedi_lib.UniMedI(vision, text, DINOHead(out_dim=32, hidden_dim=32, bottleneck_dim=16), embed_dim=16)


@pytest.fixture(scope="module")
def model_and_params():
    model = tiny_model()
    volume = jax.random.normal(jax.random.PRNGKey(1), (2,) + VOLUME + (1,))
    # jitted: one compile of the whole init (about half the CPU time of initialising op by op)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), volume[:1],
                                 jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 6), jnp.int32),
                                 jnp.ones((1, 6), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    return model, params, volume


def test_attentive_slice_scores_and_select_slices():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 2, 4, 12))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    scores = np.asarray(unimedi_lib.attentive_slice_scores(jnp.asarray(attention), 3))
    expected = attention.mean(axis=(0, 2)).reshape(2, 3, 4).mean(-1)
    assert scores.dtype == np.float32 and scores.shape == (2, 3)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    top = np.asarray(unimedi_lib.select_slices(jnp.asarray([[0.1, 0.5, 0.3, 0.5], [0.4, 0.0, 0.9, 0.2]]), 3))
    assert top.dtype == np.int32 and top.tolist() == [[1, 3, 2], [2, 0, 3]]  # ties: the lower index first
    with pytest.raises(ValueError, match="do not split"):
        unimedi_lib.attentive_slice_scores(jnp.asarray(attention), 5)
    with pytest.raises(ValueError, match="1 <= k"):
        unimedi_lib.select_slices(jnp.zeros((2, 3)), 4)


def _layer_norm(x, p, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_slice_scores_equal_numpy_attention_of_the_model(model_and_params):
    """v = 1/(HL) sum softmax(q_lh([CLS]) K_lh(patches)^T / sqrt(C)), s_i = mean of v over slab i, from the block
    inputs and the q/k weights in numpy -- against the model's sown logits path."""
    model, params, volume = model_and_params
    tokens = model.apply({"params": params}, volume, method=lambda m, v: m.vision.volume_tokens(v))
    hidden = model.apply({"params": params}, tokens, method=lambda m, t: m.vision.encoder.hidden_states(t))
    inputs = [np.asarray(tokens)] + [np.asarray(h) for h in hidden[:-1]]
    maps = []
    for layer, x in enumerate(inputs):
        block = jax.tree.map(np.asarray, params["vision"]["encoder"][f"blocks_{layer}"])
        y = _layer_norm(x.astype(np.float64), block["norm1"])
        q = np.einsum("btd,dhk->bthk", y, block["attn"]["query"]["kernel"]) + block["attn"]["query"]["bias"]
        k = np.einsum("btd,dhk->bthk", y, block["attn"]["key"]["kernel"]) + block["attn"]["key"]["bias"]
        logits = np.einsum("bhk,bthk->bht", q[:, 0], k[:, 1:]) / np.sqrt(q.shape[-1])
        maps.append(np.exp(logits - logits.max(-1, keepdims=True)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    v = np.mean(maps, axis=(0, 2))  # (B, patches)
    expected = v.reshape(2, 4, -1).mean(-1)
    slabs, scores = unimedi_lib.select_volume_slices(model, params, volume, 2)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(slabs), np.argsort(-expected, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(np.asarray(scores).sum(1), 4 / 64, rtol=1e-5)  # v sums to 1 over 64 patches


def test_scanned_encoder_gives_the_same_slice_scores(model_and_params):
    from medjax.nn.transformer_layout import stack_layers

    model, params, volume = model_and_params
    scanned = tiny_model(scan=True)
    stacked = dict(params, vision=dict(params["vision"], encoder=stack_layers(params["vision"]["encoder"])))
    _, unrolled_scores = unimedi_lib.select_volume_slices(model, params, volume, 2)
    _, scanned_scores = unimedi_lib.select_volume_slices(scanned, stacked, volume, 2)
    np.testing.assert_allclose(np.asarray(scanned_scores), np.asarray(unrolled_scores), rtol=1e-5)


def test_pseudo_pair_token_layout_and_masks(model_and_params):
    model, params, volume = model_and_params
    slabs = jnp.asarray([[3, 0], [1, 2]], jnp.int32)
    run = lambda fn, *args: model.apply({"params": params}, *args, method=fn)  # noqa: E731
    pair = run(lambda m, v, s: m.vision.pseudo_pair_tokens(v, s), volume, slabs)
    vol = run(lambda m, v: m.vision.volume_tokens(v), volume)
    images = run(lambda m, v, s: m.vision.slice_images(v, s), volume, slabs)
    # the centre slice of each 2-slice slab, repeated to 3 channels
    np.testing.assert_array_equal(np.asarray(images[0, 0, ..., 0]), np.asarray(volume[0, 3 * 2 + 1, ..., 0]))
    np.testing.assert_array_equal(np.asarray(images[1, 1, ..., 2]), np.asarray(volume[1, 2 * 2 + 1, ..., 0]))
    per_slice = run(lambda m, x: m.vision.image_tokens(x), images.reshape((4,) + images.shape[2:]))[:, 1:]
    n3, n2 = 64, 16
    assert pair.shape == (2, 1 + n3 + 2 * n2, 32)
    np.testing.assert_allclose(np.asarray(pair[:, :1 + n3]), np.asarray(vol), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pair[:, 1 + n3:]), np.asarray(per_slice.reshape(2, 2 * n2, 32)), rtol=1e-6)
    # masks: a masked position holds the mask token + its position embedding, the rest is unchanged
    vmask = jnp.zeros((2, n3), bool).at[0, 5].set(True)
    smask = jnp.zeros((2, 2 * n2), bool).at[1, n2 + 3].set(True)
    masked = run(lambda m, v, s, a, b: m.vision.pseudo_pair_tokens(v, s, a, b), volume, slabs, vmask, smask)
    enc = params["vision"]["encoder"]
    mask_token = np.asarray(enc["mask_token"][0])
    np.testing.assert_allclose(np.asarray(masked[0, 1 + 5]), mask_token + np.asarray(params["vision"]["volume_pos_embed"][0, 5]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(masked[1, 1 + n3 + n2 + 3]), mask_token + np.asarray(enc["pos_embed"][0, 1 + 3]),
                               rtol=1e-5, atol=1e-6)
    same = np.ones(pair.shape[1], bool)
    same[1 + 5] = False
    np.testing.assert_allclose(np.asarray(masked[0, same]), np.asarray(pair[0, same]), rtol=1e-6)
    masks = np.asarray(unimedi_lib.random_token_masks(jax.random.PRNGKey(0), 3, 10, 0.6))
    assert masks.shape == (3, 10) and (masks.sum(1) == 6).all() and len({tuple(r) for r in masks}) == 3


def test_clip_contrastive_loss_by_hand():
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    scale = 14.0
    u = image / np.linalg.norm(image, axis=1, keepdims=True)
    v = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = scale * u @ v.T
    log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    expected = -0.5 * (np.mean(np.diag(log_rows)) + np.mean(np.diag(log_cols)))
    got = float(clip_contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(scale)))
    assert got == pytest.approx(expected, rel=1e-5)
