"""PTUnifier pretraining end to end on the image-report demo data (JSONL manifest + local tokenizer): the
tiny variant trains with a finite loss and evaluates; the optimiser's lr groups and the
released-code flag; the towers initialised from Hugging Face directories."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from medjax import config as config_lib
from medjax import optim as optim_lib
from medjax.tasks import build_task
from medjax.tasks.ptunifier import PTUnifierTask
from medjax.trainer import Trainer

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def demo(demo_roots):
    return demo_roots("image_report")  # the session's image-report demo (tests/experiment_data.py: 40 images, 32 px)


def tiny(demo, *overrides):
    return config_lib.get_config("ptunifier", "tiny", [f"data.dir={demo}", "train.steps=2", *overrides])


# One fusion block and one device keep the train-step compile small (sharded ITC: tests/losses/test_contrastive.py).
FAST = ("model.fusion_layers=1", "mesh.num_devices=1")


def test_tiny_pretraining_runs_and_evaluates(demo, tmp_path):
    config = tiny(demo, *FAST)
    task = build_task(config, **QUIET)
    assert isinstance(task, PTUnifierTask) and task.model_cfg.vocab_size > 100  # from the demo tokenizer
    trainer = Trainer(config, task, str(tmp_path))
    result = trainer.run()
    assert result["step"] == 2 and np.isfinite(result["losses"]).all()
    # L = MLM + 0.5 ITM + 0.1 ITC starts near ln(vocab) + 0.5 ln 2 + 0.1 ln(batch) for a random model.
    expected = np.log(task.model_cfg.vocab_size) + 0.5 * np.log(2) + 0.1 * np.log(8)
    assert abs(result["losses"][0] - expected) < 1.5
    results = task.evaluate(jax.device_get(trainer.state["params"]))
    for key in ("mlm_loss", "mlm_accuracy", "itm_loss", "itm_accuracy", "ir_r1", "tr_r1", "tr_r10", "itc_loss"):
        assert np.isfinite(results[key]), key
    assert 0.0 <= results["itm_accuracy"] <= 1.0 and 0.0 <= results["ir_r1"] <= results["ir_r5"] <= 100.0
    # chance beside each number (issue #23): 4 val pairs of the test demo
    assert results["itm_accuracy_chance"] == 0.5 and results["itc_loss_chance"] == pytest.approx(np.log(4))
    assert results["tr_r1_chance"] == results["ir_r1_chance"] == 25.0 and results["ir_r5_chance"] == 100.0


def _abstract_params(task):
    """Zeros of the params' shapes (no model compile)."""
    shapes = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("released", [False, True])
def test_optimizer_lr_groups_and_released_code_flag(demo, released):
    task = build_task(tiny(demo, f"reproduce_released_code={released}", "train.steps=100"), **QUIET)
    assert task.weights == {"mlm": 1.0, "itm": 0.5, "itc": 0.0 if released else 0.1}
    assert task.model.prompts_trainable is (not released)
    full = _abstract_params(task)
    # the leaves asserted below, one per lr group (the optimizer labels a tree by its paths, at init)
    params = {"text": {"layers_0": {"fc1": full["text"]["layers_0"]["fc1"]}}, "fusion_0": {"text": {"fc1": full[
        "fusion_0"]["text"]["fc1"]}}, "mlm_bias": full["mlm_bias"], "modality_type": full["modality_type"],
        "visual_prompts": full["visual_prompts"]}
    tx, schedule = task.make_optimizer(100)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1e-3) < 1e-9 and float(schedule(100)) == 0.0
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for _ in range(2):  # step 0 has lr 0 (warmup); step 1: Adam's update is -lr(1) * multiplier on a bias
        updates, state = tx.update(grads, state, params)
    lr = float(schedule(1))
    bias = lambda tree: float(np.asarray(tree["bias"]).ravel()[0])  # noqa: E731
    np.testing.assert_allclose(bias(updates["text"]["layers_0"]["fc1"]), -lr, rtol=1e-4)  # base
    np.testing.assert_allclose(bias(updates["fusion_0"]["text"]["fc1"]), -5 * lr, rtol=1e-4)  # multi-modal x5
    np.testing.assert_allclose(float(updates["mlm_bias"][0]), -5 * lr, rtol=1e-4)  # heads x5
    np.testing.assert_allclose(float(updates["modality_type"]["embedding"][0, 0]), -lr, rtol=1e-4)  # base, as released
    pool_update = np.abs(np.asarray(updates["visual_prompts"]["pool"])).max()
    assert (pool_update == 0.0) if released else np.isclose(pool_update, 5 * lr, rtol=1e-4)
    lr_mults = optim_lib.lr_multipliers(task.optim_config(), {"itc_text_proj": {"kernel": 0}, "vision": {"ln_pre": 0}})
    assert lr_mults == {"itc_text_proj/kernel": 5.0, "vision/ln_pre": 1.0}


def test_towers_initialised_from_hugging_face_directories(demo, tmp_path):
    vocab = build_task(tiny(demo), **QUIET).model_cfg.vocab_size  # the demo tokenizer's size
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5))
    clip.save_pretrained(tmp_path / "clip")
    roberta.save_pretrained(tmp_path / "roberta")
    towers = (f"model.init_vision={tmp_path / 'clip'}", f"model.init_text={tmp_path / 'roberta'}")
    task = build_task(tiny(demo, *towers), **QUIET)
    params = task.initial_params(_abstract_params(task))
    state = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}  # 4.x / 5.x names
    # Tiny keeps 1 of the 2 CLIP blocks (the second is skipped); q kernel = weight^T split by heads.
    q = state["encoder.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_allclose(params["vision"]["layers_0"]["attn"]["query"]["kernel"], q.T.reshape(32, 2, 16))
    assert "layers_1" not in params["vision"]
    # 16 px / patch 8 (2 x 2 grid) resized to the model's 32 px (4 x 4): class position kept.
    position = state["embeddings.position_embedding.weight"].numpy()
    assert params["vision"]["position_embedding"].shape == (17, 32)
    np.testing.assert_allclose(params["vision"]["position_embedding"][0], position[0])
    words = roberta.state_dict()["embeddings.word_embeddings.weight"].numpy()
    np.testing.assert_allclose(params["text"]["word_embeddings"]["embedding"], words)
    assert np.all(params["fusion_0"]["text"]["fc1"]["kernel"] == 0)  # the rest is untouched
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_task(tiny(demo, f"model.init_text={tmp_path / 'missing'}"), **QUIET).initial_params(params)
