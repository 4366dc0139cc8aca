"""PathChat on the pathology_chat demo (PNG tiles + LLaVA JSON + local tokenizer): label masks per template
supervise exactly the assistant replies; masking that cannot be computed is refused naming file, record and
field; stage 1 trains only the projector, stage 2 the LLM too, through the Trainer; evaluation in
PathQABench's layout."""
import contextlib
import io
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


SEED = 0
STAGE1_STEPS, STAGE2_STEPS, EVAL_TILES = 150, 100, 32
BUCKETS = (96,)  # stage 2's conversations are 77-120 tokens: rows padded to 96 or to max_length=128


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """Issue #23's demo recipe at the tiny size on 240 tiles, run once for the tests below: stage 1 (captions,
    LLM + projector, short sequences), then stage 2 from it (`init=`, validated at its last step), then the
    evaluation of 32 unseen tiles (multiple choice, open-ended answers written). Params are kept before / after
    each stage."""
    from medjax.data.demo.pathology_chat import make_pathology_chat_demo

    root = make_pathology_chat_demo(str(tmp_path_factory.mktemp("chat_demo")), num_eval=EVAL_TILES)
    work = tmp_path_factory.mktemp("chat_runs")
    common = [f"data.dir={root}", "mesh.num_devices=1", "train.log_every=50", "optim.lr=1e-2", f"seed={SEED}"]
    params = lambda trainer: jax.device_get(nn.unbox(trainer.state["params"]))  # noqa: E731
    stage1 = config_lib.get_config("pathchat_stage1", "tiny", common + [
        f"train.steps={STAGE1_STEPS}", f"train.checkpoint_every={STAGE1_STEPS}", "data.max_length=48",
        "optim.frozen=['^vision_tower/']"])
    task1 = build_task(stage1, **QUIET)
    trainer1 = Trainer(stage1, task1, str(work / "s1"))
    out = {"root": root, "work": work, "task1": task1, "stage1_start": params(trainer1), "stage1": trainer1.run()}
    out["stage1_end"] = params(trainer1)
    stage2 = config_lib.get_config("pathchat_stage2", "tiny", common + [
        f"train.steps={STAGE2_STEPS}", f"train.checkpoint_every={STAGE2_STEPS}", f"train.eval_every={STAGE2_STEPS}",
        f"init={work / 's1'}", f"data.length_buckets={list(BUCKETS)}"])
    out["task2"] = task2 = build_task(stage2, **QUIET)
    trainer2 = Trainer(stage2, task2, str(work / "s2"))
    with contextlib.redirect_stdout(io.StringIO()) as log:  # the Trainer's log: one compile per bucket used
        out["stage2"] = trainer2.run()
    out["trainer2"] = trainer2
    out["stage2_log"] = log.getvalue().splitlines()
    out["stage2_end"] = params(trainer2)
    out["results"] = task2.evaluate(out["stage2_end"])
    return out


def changed(before, after, part):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))


def abstract_labels(config):
    task = build_task(config, **QUIET)
    return task, frozen_labels(task.optim_config(), nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0))))


def test_stage1_trains_only_the_projector(demo, two_stages):
    """The paper's stage 1 labels only the projector trained; the Trainer's multi_transform keeps the frozen part
    bit-identical (the demo recipe's stage 1: vision tower frozen, LLM + projector trained)."""
    task, labels = abstract_labels(tiny(demo, 1))
    assert isinstance(task, PathChatTask) and task.model.num_image_tokens == 4
    assert set(jax.tree.leaves(labels["multi_modal_projector"])) == {"trained"}
    assert set(jax.tree.leaves(labels["language_model"])) == set(jax.tree.leaves(labels["vision_tower"])) == {"frozen"}
    before, after, result = two_stages["stage1_start"], two_stages["stage1_end"], two_stages["stage1"]
    assert result["step"] == STAGE1_STEPS and np.isfinite(result["losses"]).all()
    assert abs(result["losses"][0] - np.log(len(two_stages["task1"].tokenizer))) < 1.5  # random init: ~ ln(vocab)
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert changed(before, after, "multi_modal_projector") and changed(before, after, "language_model")
    assert not changed(before, after, "vision_tower")


def test_stage2_trains_llm_and_projector_not_the_vision_tower(demo, two_stages):
    _, labels = abstract_labels(tiny(demo, 2))
    assert set(jax.tree.leaves(labels["vision_tower"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["language_model"])) == set(jax.tree.leaves(labels["multi_modal_projector"])) \
        == {"trained"}
    before, after = two_stages["stage1_end"], two_stages["stage2_end"]  # stage 2 starts from stage 1 (init=)
    assert two_stages["stage2"]["step"] == STAGE2_STEPS
    assert changed(before, after, "language_model") and changed(before, after, "multi_modal_projector")
    assert not changed(before, after, "vision_tower")


def test_stage1_then_stage2_reads_the_tile(two_stages):
    """Issue #23: the demo learns, not chance: the multiple-choice diagnosis of 32 unseen tiles is read from the
    image (the demo variant itself reaches 100 % after its 120 + 120 steps)."""
    results, task = two_stages["results"], two_stages["task2"]
    assert results["mcq_image_only_accuracy_chance"] == results["mcq_with_context_accuracy_chance"] == 0.25
    assert results["mcq_image_only_accuracy"] >= 0.75 and results["mcq_with_context_accuracy"] >= 0.75
    assert results["eval_loss"] < 0.5
    assert "(chance 25.00)" in task.results_table("pathchat_stage2", [("s2", results)])


def test_open_ended_answers_are_written_for_judging(two_stages):
    results = two_stages["results"]
    written = os.path.join(two_stages["root"], "pathqabench", "pathqabench_open_answers.jsonl")
    rows = [json.loads(line) for line in open(written)]
    assert len(rows) == results["open_answers"] == EVAL_TILES
    assert {"id", "question", "answer", "reference"} <= set(rows[0]) and rows[0]["reference"].startswith("There are")


def test_validation_is_the_teacher_forced_answer_loss(demo, two_stages):
    """train.eval_every runs `validate` (no generation): the answer loss / token accuracy on instruct_val.json, the
    declared selection metric, kept as the best-validation checkpoint; stage 1 (no validation file) refuses."""
    from medjax.best_checkpoint import best_dir, read_best
    from medjax.config import ConfigError

    task = two_stages["task2"]
    assert task.selection_metric() == ("loss", "min")
    rows = [json.loads(line) for line in open(two_stages["work"] / "s2" / "metrics.jsonl")]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [STAGE2_STEPS]
    assert val[0]["val/loss"] == pytest.approx(two_stages["results"]["eval_loss"], rel=1e-5)  # evaluate's eval_loss
    assert 0.8 < val[0]["val/token_accuracy"] <= 1.0
    best = best_dir(str(two_stages["work"] / "s2"))
    assert best is not None and read_best(best)["step"] == STAGE2_STEPS
    stage1 = build_task(tiny(demo, 1), **QUIET)
    assert stage1.selection_metric() is None
    with pytest.raises(ConfigError, match="data.eval_file is empty"):
        stage1.validate(two_stages["stage1_end"])


def test_length_buckets_change_only_the_padding(two_stages):
    """data.length_buckets: stage 2 ran with rows padded to 96 or 128 tokens, one compiled step per bucket; a
    bucketed row is the max_length row cut at its bucket (the cut part padding: ids pad, labels -100, mask 0), so
    the per-row answer NLL, supervised-token count and accuracy are those of the unbucketed rows."""
    from medjax.data.pipelines.length_buckets import bucket_for

    task = two_stages["task2"]
    assert task.buckets == (96, 128)
    compiles = [line for line in two_stages["stage2_log"] if line.startswith("compiled train step")]
    assert len(compiles) == 2 and "batch shape 2: {" in compiles[1], compiles  # both buckets, each compiled once
    items = list(task.conversations(task.config.data.train_file))
    short = [item for item in items if task.example.length(item) <= 96][:8]
    assert len(short) == 8 and bucket_for(max(task.example.length(i) for i in short), task.buckets) == 96
    full = [task.example(item) for item in short]
    cut = [task.example(item, None, 96) for item in short]
    for a, b in zip(full, cut):
        assert b["input_ids"].shape == (96,) and not a["attention_mask"][96:].any()
        assert (a["labels"][96:] == IGNORE).all() and (a["input_ids"][96:] == task.example.pad_id).all()
        for key in ("input_ids", "labels", "attention_mask"):
            np.testing.assert_array_equal(a[key][:96], b[key])
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    params = jax.device_put(two_stages["stage2_end"])
    stack = lambda rows: {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    unbucketed, bucketed = task._score(params, stack(full)), task._score(params, stack(cut))
    np.testing.assert_allclose(bucketed[0], unbucketed[0], rtol=1e-5, atol=1e-5)  # answer NLL per row
    np.testing.assert_array_equal(bucketed[1], unbucketed[1])  # supervised tokens
    np.testing.assert_array_equal(bucketed[2], unbucketed[2])  # correct argmax tokens
    # the bench's tokens/s counts a batch's real tokens, not its bucket's (or max_length's) padding
    real = sum(task.example.length(item) for item in short)
    assert task.work_in_batch(stack(cut)) == task.work_in_batch(stack(full)) == real < 8 * 96 < 8 * 128
    assert task.work_per_example() == (128, "tokens")


def test_bf16_train_step_runs_close_to_float32(two_stages):
    """dtype=bfloat16 (the full variants' compute; params stay float32): one executed stage-2 train step (forward,
    backward, Adam) from the trained stage-2 state (its optimizer state; a 4x longer schedule so the lr is not 0),
    beside the float32 step from the same state and batch (the Trainer's compiled step, from the compilation
    cache): finite loss and gradient norm, the LLM and projector changed, the frozen tower not; the loss within 0.02 + 5 % of float32's (bf16 keeps ~3 significant digits), the
    gradient norm within 25 %. The matmuls run in bf16; logits and gradients are float32 (traced)."""
    import jax.numpy as jnp

    from medjax.trainer import global_batch, make_train_step

    task32, trainer = two_stages["task2"], two_stages["trainer2"]
    config = config_lib.get_config("pathchat_stage2", "tiny", [f"data.dir={two_stages['root']}", "mesh.num_devices=1",
                                                               "dtype=bfloat16"])
    task16 = build_task(config, **QUIET)
    items = [item for item in task32.conversations(task32.config.data.train_file)
             if task32.example.length(item) <= BUCKETS[0]][:8]  # a batch of the 96-token bucket (compiled already)
    rows = [task32.example(item, None, BUCKETS[0]) for item in items]
    batch = global_batch({k: np.stack([r[k] for r in rows]) for k in ("pixel_values", "input_ids", "labels",
                                                                       "attention_mask")},
                         trainer.batch_sharding, 1)
    start = trainer.state  # step STAGE2_STEPS: the schedule's end, lr 0
    params = jax.device_get(start["params"])
    tx, schedule = task16.make_optimizer(4 * STAGE2_STEPS)  # the same optimizer state, its lr > 0 at this step
    step16 = jax.jit(make_train_step(task16, tx, schedule, 1))
    with jax.set_mesh(trainer.mesh):
        state16, metrics16 = jax.device_get(step16(start, batch))
        compiled32, _, _ = trainer.compile(batch)  # the float32 step stage 2 trained with (donates its input)
        state32, metrics32 = jax.device_get(compiled32(jax.tree.map(jnp.copy, start), batch))
    loss16, loss32 = float(metrics16["loss"]), float(metrics32["loss"])
    assert np.isfinite(loss16) and abs(loss16 - loss32) <= 0.02 + 0.05 * loss32, (loss16, loss32)
    norm16, norm32 = float(metrics16["grad_norm"]), float(metrics32["grad_norm"])
    assert np.isfinite(norm16) and norm16 > 0 and abs(norm16 - norm32) <= 0.25 * norm32, (norm16, norm32)
    new16 = state16["params"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(new16))
    assert changed(params, new16, "language_model") and changed(params, new16, "multi_modal_projector")
    assert not changed(params, new16, "vision_tower")
    assert {leaf.dtype for leaf in jax.tree.leaves(new16)} == {np.dtype(np.float32)}
    (value, _), grads = jax.eval_shape(jax.value_and_grad(task16.loss_fn, has_aux=True), params, batch,
                                       jax.random.key(0), True)
    assert value.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}

    def forward(p):
        return task16.model.apply({"params": p}, batch["input_ids"], pixel_values=batch["pixel_values"],
                                  attention_mask=batch["attention_mask"])

    assert jax.eval_shape(forward, params).dtype == jnp.float32
    jaxpr = jax.make_jaxpr(forward)(params)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots[:-1] for v in e.invars), \
        [[v.aval.dtype for v in e.invars] for e in dots]


def _equations(jaxpr):
    """Every equation of a jaxpr, the sub-jaxprs' (pjit, remat, scan) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(sub, "jaxpr"):
                    yield from _equations(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))
                elif hasattr(sub, "eqns"):
                    yield from _equations(sub)
