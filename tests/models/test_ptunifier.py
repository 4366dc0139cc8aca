"""PTUnifier model: prompt selection is top-k by raw dot product, the missing-modality sequences are
built as the released code builds them (PTUnifier Sec. 3.2), and every path / head has its shape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.prompt_pool import PromptPool, select_prompts
from medjax.models.ptunifier import PTUNIFIER_TINY, PTUnifier
from tests.models.random_params import random_params

B, T = 3, 7
CFG = PTUNIFIER_TINY  # width 32, vision 32 px / patch 8 (16 patches), pool 16, prompts 4 visual / 3 textual


def test_select_prompts_is_top_k_by_dot_product():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(20, 6)).astype(np.float32)
    query = rng.normal(size=(4, 6)).astype(np.float32)
    prompts, indices = jax.jit(select_prompts, static_argnums=2)(query, pool, 5)
    expected = np.argsort(-(query.astype(np.float64) @ pool.T.astype(np.float64)), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.asarray(indices), expected)  # highest first
    np.testing.assert_array_equal(np.asarray(prompts), pool[expected])
    # Raw dot products, not cosine: a long pool vector wins over a better-aligned short one.
    pool2 = np.array([[10.0, 3.0], [1.0, 0.0]], np.float32)
    _, top = select_prompts(np.array([[1.0, 0.0]], np.float32), pool2, 1)
    assert int(top[0, 0]) == 0
    with pytest.raises(ValueError, match="k=21"):
        select_prompts(query, pool, 21)


@pytest.mark.parametrize("trainable", [True, False])
def test_pool_gradient_reaches_only_the_selected_prompts(trainable):
    module = PromptPool(size=10, width=4, trainable=trainable)
    query = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)), jnp.float32)
    params = nn.unbox(module.init(jax.random.key(0), query, 3))["params"]
    grad = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, query, 3)[0] ** 2))(params)["pool"]
    _, indices = module.apply({"params": params}, query, 3)
    selected = np.zeros(10, bool)
    selected[np.asarray(indices).ravel()] = True
    if trainable:  # d/dpool sum(prompts^2) = 2 * pool row * (times selected)
        counts = np.bincount(np.asarray(indices).ravel(), minlength=10)[:, None]
        np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(params["pool"]) * counts, rtol=1e-6)
        assert np.all(np.asarray(grad)[~selected] == 0) and np.all(np.abs(np.asarray(grad)[selected]) > 0)
    else:  # the released code: selection under no_grad, pools never change
        assert np.all(np.asarray(grad) == 0)


def everything(module, images, ids, mask):
    text_embeddings, image_seq, visual_idx = module.visual_prompt_tokens(ids, mask)
    image_embeddings, text_seq, textual_idx = module.textual_prompt_tokens(images)
    special = module.text.embed(jnp.asarray([[module.cls_token_id, module.sep_token_id]]))  # positions pad+1, pad+2
    both, text_only, image_only = (module.infer(images, ids, mask), module.infer_text_only(ids, mask),
                                   module.infer_image_only(images))
    itc_image, itc_text = module.itc_features(image_only["cls_feats"], text_only["cls_feats"])
    heads = dict(mlm_logits=module.mlm_logits(both["text_feats"]), itm_logits=module.itm_logits(both["cls_feats"]),
                 itc_image=itc_image, itc_text=itc_text)
    partner = jnp.asarray([1, 2, 0])
    pretraining = module.pretraining_outputs(images, ids, ids, mask, partner)
    itm_partner = module.itm_logits(module.infer(images[partner], ids, mask)["cls_feats"])
    return dict(pretraining=pretraining, itm_partner=itm_partner, text_embeddings=text_embeddings,
                image_seq=image_seq, visual_idx=visual_idx,
                image_embeddings=image_embeddings, text_seq=text_seq, textual_idx=textual_idx, special=special,
                both=both, text_only=text_only, image_only=image_only, heads=heads)


@pytest.fixture(scope="module")
def outputs():
    model = PTUnifier(**CFG)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, CFG["image_size"], CFG["image_size"], 3)).astype(np.float32)
    ids = rng.integers(5, CFG["vocab_size"], size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 4], ids[1, 5:], mask[1, 5:] = 2, 1, 0  # a padded row
    # random params of the init's shapes (no init compile: only the forward below is compiled)
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, method=everything), images, ids, mask)
    params = random_params(abstract["params"])
    out = jax.device_get(jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=everything))(params, images, ids,
                                                                                                     mask))
    return params, out, mask



def test_image_missing_sequence_is_class_token_then_top_k_visual_prompts(outputs):
    params, out, mask = outputs
    vision, pool = params["vision"], params["visual_prompts"]["pool"]
    embeddings = out["text_embeddings"]
    m = mask[:, 1:, None].astype(np.float64)
    query = (embeddings[:, 1:] * m).sum(1) / (m.sum(1) + 1e-8)  # masked mean of text embeddings, CLS excluded
    top = np.argsort(-(query @ pool.T.astype(np.float64)), axis=1, kind="stable")[:, :CFG["num_visual_prompts"]]
    np.testing.assert_array_equal(out["visual_idx"], top)
    seq = out["image_seq"]
    assert seq.shape == (B, 1 + CFG["num_visual_prompts"], CFG["vision_width"])
    cls = vision["class_embedding"] + vision["position_embedding"][0]
    np.testing.assert_allclose(seq[:, 0], np.broadcast_to(cls, (B, cls.size)), atol=1e-6)
    np.testing.assert_allclose(seq[:, 1:], pool[top], atol=1e-6)  # no position embedding on prompts
    # The padded row's query ignores its padding: changing padded embeddings would not move it.
    assert not np.allclose(query[1], embeddings[1, 1:].mean(0))


def test_text_missing_sequence_is_bos_prompts_eos(outputs):
    params, out, _ = outputs
    pool = params["textual_prompts"]["pool"]
    query = out["image_embeddings"][:, 1:].mean(1)  # patch + position embeddings, CLS excluded
    top = np.argsort(-(query.astype(np.float64) @ pool.T.astype(np.float64)), axis=1,
                     kind="stable")[:, :CFG["num_textual_prompts"]]
    np.testing.assert_array_equal(out["textual_idx"], top)
    seq = out["text_seq"]
    assert seq.shape == (B, 2 + CFG["num_textual_prompts"], CFG["text_width"])
    np.testing.assert_allclose(seq[:, 1:-1], pool[top], atol=1e-6)
    # <s> and </s> are each embedded as a length-1 sequence: both carry the first position (pad + 1),
    # as the released code's `embeddings(input_ids=full((B, 1), id))`.
    bos, eos_at_second_position = out["special"][0, 0], out["special"][0, 1]
    np.testing.assert_allclose(seq[:, 0], np.broadcast_to(bos, seq[:, 0].shape), atol=1e-5)
    text = params["text"]
    word, position = text["word_embeddings"]["embedding"], text["position_embeddings"]["embedding"]
    raw = word[CFG["sep_token_id"]] + text["token_type_embeddings"]["embedding"][0] + position[CFG["pad_token_id"] + 1]
    norm = text["embedding_norm"]
    eos = (raw - raw.mean()) / np.sqrt(raw.var() + CFG["text_layer_norm_eps"]) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(seq[:, -1], np.broadcast_to(eos, seq[:, -1].shape), atol=1e-5)
    assert not np.allclose(seq[0, -1], eos_at_second_position, atol=1e-3)  # not the second position's embedding


def test_paths_and_heads_have_the_paper_shapes(outputs):
    _, out, _ = outputs
    h, patches = CFG["hidden_size"], (CFG["image_size"] // CFG["patch_size"]) ** 2
    expected = {"both": (T, 1 + patches), "text_only": (T, 1 + CFG["num_visual_prompts"]),
                "image_only": (2 + CFG["num_textual_prompts"], 1 + patches)}
    for path, (text_len, image_len) in expected.items():
        assert out[path]["text_feats"].shape == (B, text_len, h)
        assert out[path]["image_feats"].shape == (B, image_len, h)
        assert out[path]["cls_feats"].shape == (B, 2 * h)
        assert np.all(np.abs(out[path]["cls_feats"]) <= 1.0)  # tanh poolers
        assert np.isfinite(out[path]["text_feats"]).all()
    heads = out["heads"]
    assert heads["mlm_logits"].shape == (B, T, CFG["vocab_size"]) and heads["itm_logits"].shape == (B, 2)
    assert heads["itc_image"].shape == (B, h) and heads["itc_text"].shape == (B, h)
    # The missing-modality paths differ from the full one (the prompts stand in for the other modality).
    assert not np.allclose(out["both"]["cls_feats"], out["text_only"]["cls_feats"], atol=1e-3)


def test_mismatched_widths_are_rejected():
    model = PTUnifier(**dict(CFG, text_width=16))
    with pytest.raises(ValueError, match="vision_width=32 and text_width=16"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32),
                       jnp.ones((1, 4), jnp.int32))


def test_shared_pretraining_pass_equals_the_separate_paths(outputs):
    _, out, _ = outputs
    pre, heads = out["pretraining"], out["heads"]
    np.testing.assert_allclose(pre["mlm_logits"], heads["mlm_logits"], atol=1e-5)  # (image b, text b)
    np.testing.assert_allclose(pre["itm_logits"], out["itm_partner"], atol=1e-5)  # (image partner[b], text b)
    np.testing.assert_allclose(pre["itc_image"], heads["itc_image"], atol=1e-5)
    np.testing.assert_allclose(pre["itc_text"], heads["itc_text"], atol=1e-5)


def test_init_is_the_originals_init_weights_outside_the_towers():
    """METER's objectives.init_weights, as the modules' own initialisers: outside the towers every kernel /
    embedding N(0, 0.02), every bias 0, every LayerNorm (1, 0); the towers keep Glorot kernels. The report-generation
    model holds all three models' modules (backbone, task head, decoder). The unsafe_rbg key only makes the
    init's random bits cheaper to compile: the initialisers' distributions are what is tested."""
    from medjax.models.ptunifier_reportgen import PTUnifierReportGen

    model = PTUnifierReportGen(**CFG, num_outputs=3, decoder_layers=1)
    images, ids = jnp.zeros((1, CFG["image_size"], CFG["image_size"], 3)), jnp.zeros((1, 4), jnp.int32)
    boxed = jax.jit(lambda key: model.init(key, images, ids, jnp.ones_like(ids))["params"])(
        jax.random.key(0, impl="unsafe_rbg"))
    assert isinstance(boxed["itm_head"]["kernel"], nn.Partitioned)  # logically partitioned, as before
    assert boxed["itm_head"]["kernel"].names == ("embed", "classes")
    drawn, tower_kernels = [], 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(nn.unbox(boxed))):
        names, value = [str(getattr(k, "key", k)) for k in path], np.asarray(leaf, np.float64)
        if names[0] in ("vision", "text"):
            if names[-1] == "kernel" and names[-2] in ("query", "fc1"):  # Glorot-uniform: std sqrt(2 / (in + out))
                assert float(value.std()) > 0.1 and np.abs(value).max() <= np.sqrt(6 / 64) + 1e-6, names
                tower_kernels += 1
        elif names[-1] in ("kernel", "embedding", "pool"):
            drawn.append(value.ravel())
            assert np.abs(value).max() < 6 * 0.02, names  # no Glorot-uniform kernel left (limit 0.3 at width 32)
            if value.size >= 1000:
                assert abs(float(value.std()) - 0.02) < 0.002 and abs(float(value.mean())) < 0.002, names
        elif names[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0, err_msg="/".join(names))
        else:  # biases: the Linears', the LayerNorms', the MLM / LM output biases
            assert names[-1].endswith("bias"), names
            np.testing.assert_array_equal(value, 0.0, err_msg="/".join(names))
    assert tower_kernels == 4  # the query and fc1 kernels of the one layer of each tower
    drawn = np.concatenate(drawn)
    assert drawn.size > 50_000 and abs(float(drawn.std()) - 0.02) < 0.0005 and abs(float(drawn.mean())) < 0.0003
    # normal, not uniform: P(|x| < sigma) = 0.683 (a uniform of the same std: 0.577)
    assert abs(float(np.mean(np.abs(drawn) < 0.02)) - 0.683) < 0.01
