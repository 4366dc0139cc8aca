"""PathChat on the pathology_chat demo (PNG tiles + LLaVA JSON + local tokenizer): label masks per template
supervise exactly the assistant replies; masking that cannot be computed is refused naming file, record and
field; stage 1 trains only the projector, stage 2 the LLM too, through the Trainer; evaluation in
PathQABench's layout."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.data.errors import DataError
from medjax.optim import frozen_labels
from medjax.tasks import build_task
from medjax.tasks.pathchat import PathChatTask, causal_lm_loss
from medjax.tasks.pathchat_data import IGNORE, ConversationDataset, encode, render
from medjax.trainer import Trainer

QUIET = dict(log=lambda *_: None)
TURNS = [("human", "<image>\nWhat is it?"), ("gpt", "A gland."), ("human", "Grade?"), ("gpt", "High.")]


@pytest.fixture(scope="module")
def demo(demo_roots):
    return demo_roots("pathology_chat")


def tiny(demo, stage, *overrides):
    return config_lib.get_config(f"pathchat_stage{stage}", "tiny", [f"data.dir={demo}", "mesh.num_devices=1",
                                                                     *overrides])


@pytest.fixture(scope="module")
def tokenizer(demo):
    from medjax.data.readers.image_report import load_tokenizer

    return load_tokenizer(os.path.join(demo, "tokenizer"))


@pytest.mark.parametrize("template, expected_text, supervised", [
    ("vicuna_v1", "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions. USER: <image><image><image>\n"
                  "What is it? ASSISTANT: A gland.</s> USER: Grade? ASSISTANT: High.</s>",
     " A gland.</s> High.</s>"),
    ("llama_2", "<s>[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
                "visual content that the user provides, and assist the user with a variety of tasks using natural "
                "language.\n<</SYS>>\n\n<image><image><image>\nWhat is it? [/INST] A gland. </s><s>[INST] Grade? "
                "[/INST] High. </s>", " A gland. </s> High. </s>"),
])
def test_template_masks_supervise_only_replies(tokenizer, template, expected_text, supervised):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = encode(render(TURNS, template, "x"), tokenizer, image_id, 3)
    assert tokenizer.decode(ids) == expected_text
    assert tokenizer.decode(labels[labels != IGNORE]) == supervised
    assert (labels[ids == image_id] == IGNORE).all() and labels[0] == IGNORE  # image tokens and BOS ignored
    kept = labels != IGNORE
    np.testing.assert_array_equal(labels[kept], ids[kept])


def test_plain_template_and_causal_loss(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = encode(render([("human", "<image>"), ("gpt", "A caption.")], "plain", "x"), tokenizer, image_id, 2)
    assert tokenizer.decode(ids) == "<s><image><image>A caption.\n"
    assert tokenizer.decode(labels[labels != IGNORE]) == "A caption.\n"
    # logits that put all mass on the next label give 0 loss over exactly the supervised tokens
    logits = np.full((1, len(ids), len(tokenizer)), -30.0, np.float32)
    logits[0, np.arange(len(ids) - 1), np.where(labels[1:] == IGNORE, 0, labels[1:])] = 30.0
    nll, count, correct = causal_lm_loss(logits, labels[None])
    assert int(count[0]) == int(np.sum(labels[1:] != IGNORE)) == int(correct[0]) and float(nll[0]) < 1e-6


@pytest.mark.parametrize("conversations, message", [
    ([{"from": "gpt", "value": "<image> hi"}, {"from": "human", "value": "x"}], r"conversations\[0\]\.from"),
    ([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}], "exactly one <image>"),
    ([{"from": "human", "value": "<image>"}], "no reply"),
    ([{"from": "human", "value": "<image>"}, {"from": "bot", "value": "x"}], r"conversations\[1\]"),
])
def test_bad_conversations_are_named(tmp_path, conversations, message):
    path = os.path.join(tmp_path, "bad.json")
    with open(path, "w") as f:
        json.dump([{"id": "ok", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]},
            {"id": "b7", "image": "a.png", "conversations": conversations}], f)
    with pytest.raises(DataError, match=rf"bad.json: record 1 \(id b7\): field .*{message}"):
        ConversationDataset(path)


def test_truncation_without_supervised_tokens_is_refused(demo):
    task = build_task(tiny(demo, 2), **QUIET)
    item = task.conversations(task.config.data.train_file)[0]
    ids, labels = encode(render(item["turns"], "llama_2", "x"), task.tokenizer, task.image_token_id, 4)
    cut = int(np.flatnonzero(ids == task.image_token_id)[-1]) + 2  # the image fits, no reply does
    assert cut < int(np.flatnonzero(labels != IGNORE)[0])
    task = build_task(tiny(demo, 2, f"data.max_length={cut}"), **QUIET)
    with pytest.raises(DataError, match=f"record 0 .*no assistant token is left .*max_length={cut}"):
        task.example(item)
    task = build_task(tiny(demo, 2, f"data.max_length={cut - 3}"), **QUIET)
    with pytest.raises(DataError, match="record 0 .*cuts into the 4 image tokens"):
        task.example(item)


def test_stage1_trains_only_the_projector(demo, tmp_path):
    config = tiny(demo, 1, "train.steps=2")
    task = build_task(config, **QUIET)
    assert isinstance(task, PathChatTask) and task.model.num_image_tokens == 4
    trainer = Trainer(config, task, str(tmp_path))
    before = jax.device_get(nn.unbox(trainer.state["params"]))
    result = trainer.run()
    assert result["step"] == 2 and np.isfinite(result["losses"]).all()
    assert abs(result["losses"][0] - np.log(len(task.tokenizer))) < 1.5  # random init: ~ ln(vocab)
    after = jax.device_get(nn.unbox(trainer.state["params"]))
    changed = lambda part: any(not np.array_equal(a, b) for a, b in zip(  # noqa: E731
        jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))
    assert changed("multi_modal_projector") and not changed("language_model") and not changed("vision_tower")


def test_stage2_freezes_the_vision_tower_and_evaluates(demo):
    task = build_task(tiny(demo, 2), **QUIET)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))  # eager init runs op by op: slow
    labels = frozen_labels(task.optim_config(), params)
    assert set(jax.tree.leaves(labels["vision_tower"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["language_model"])) == set(jax.tree.leaves(labels["multi_modal_projector"])) \
        == {"trained"}
    results = task.evaluate(params)
    assert abs(results["eval_loss"] - np.log(len(task.tokenizer))) < 1.5
    for key in ("mcq_image_only_accuracy", "mcq_with_context_accuracy"):
        assert results[key] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 questions
    written = os.path.join(demo, "pathqabench", "pathqabench_open_answers.jsonl")
    rows = [json.loads(line) for line in open(written)]
    assert len(rows) == results["open_answers"] == 4 and {"id", "answer", "reference"} <= set(rows[0])


def test_stage1_then_stage2_reads_the_tile(tmp_path_factory):
    """Issue #23: the demo learns, not chance. The demo's recipe at the tiny size on 240 tiles: stage 1 (captions,
    LLM + projector, short sequences), then stage 2 from it (`init=`); the multiple-choice diagnosis of 32 unseen
    tiles is read from the image (the demo variant itself reaches 100 % after its 120 + 120 steps)."""
    from medjax.data.demo.pathology_chat import make_pathology_chat_demo

    root = make_pathology_chat_demo(str(tmp_path_factory.mktemp("chat_demo")), num_eval=32)
    work = tmp_path_factory.mktemp("chat_runs")
    common = [f"data.dir={root}", "mesh.num_devices=1", "train.log_every=50", "data.open_file=", "optim.lr=1e-2"]
    stage1 = config_lib.get_config("pathchat_stage1", "tiny", common + [
        "train.steps=150", "train.checkpoint_every=150", "data.max_length=48", "optim.frozen=['^vision_tower/']"])
    Trainer(stage1, build_task(stage1, **QUIET), str(work / "s1")).run()
    stage2 = config_lib.get_config("pathchat_stage2", "tiny", common + [
        "train.steps=100", "train.checkpoint_every=100", f"init={work / 's1'}"])
    task = build_task(stage2, **QUIET)
    trainer = Trainer(stage2, task, str(work / "s2"))
    trainer.run()
    results = task.evaluate(jax.device_get(nn.unbox(trainer.state["params"])))
    assert results["mcq_image_only_accuracy_chance"] == results["mcq_with_context_accuracy_chance"] == 0.25
    assert results["mcq_image_only_accuracy"] >= 0.75 and results["mcq_with_context_accuracy"] >= 0.75
    assert "(chance 25.00)" in task.results_table("pathchat_stage2", [("s2", results)])
