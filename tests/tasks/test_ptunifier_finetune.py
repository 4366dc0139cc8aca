"""PTUnifier fine-tuning, every task (one per kind) at the tiny size on a small demo set: two optimizer steps change the
params with a finite loss, evaluation gives metrics in range, the paper-layout table, pretrained loading,
and the optimizer's lr groups."""
import jax
import numpy as np
import optax
import pytest

from medjax import best_checkpoint
from medjax import config as config_lib
from medjax.tasks import build_task
from medjax import optim as optim_lib
from tests.models.random_params import random_params

EXPERIMENTS = ("ptunifier_vqa", "ptunifier_cls", "ptunifier_retrieval", "ptunifier_nli", "ptunifier_melinda")
TASK_OF = {"ptunifier_vqa": "ptunifier_vqa", "ptunifier_cls": "ptunifier_classification",
           "ptunifier_retrieval": "ptunifier_retrieval", "ptunifier_nli": "ptunifier_nli",
           "ptunifier_melinda": "ptunifier_melinda"}
# the original's val/the_metric per kind (ptunifier_utils.epoch_wrapup): vqa score, mlc AUROC, cls accuracy,
# irtr: ir_r1 + tr_r1 - the validation irtr loss
SELECTION = {"ptunifier_vqa": ("overall", "max"), "ptunifier_classification": ("auc", "max"),
             "ptunifier_retrieval": ("the_metric", "max"), "ptunifier_nli": ("accuracy", "max"),
             "ptunifier_melinda": ("accuracy", "max")}


@pytest.fixture(scope="module")
def demo_root(demo_roots):
    return demo_roots("image_report")  # the session's image-report demo (tests/experiment_data.py: 40 images, 32 px)


@pytest.fixture(scope="module")
def trained(demo_root):
    """exp -> (task, params before, params after two steps, losses); built lazily, each once."""
    cache = {}

    def get(exp):
        if exp not in cache:
            overrides = [f"data.dir={demo_root}", "model.fusion_layers=1"]
            if exp == "ptunifier_retrieval":
                overrides.append("finetune.retrieval_score=both")
            if exp == "ptunifier_cls":
                overrides.append("data.eval_split=train")  # 4 test images may miss a label's positives
            config = config_lib.get_config(exp, "tiny", overrides)
            task = build_task(config, log=lambda *_: None)
            params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))  # no init compile
            tx, _ = task.make_optimizer(int(config.train.steps))

            @jax.jit
            def step(params, opt_state, batch, rng):
                (loss, metrics), grads = jax.value_and_grad(
                    lambda p: task.loss_fn(p, batch, rng, True), has_aux=True)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss, metrics

            new, opt_state, losses, data = params, tx.init(params), [], iter(task.train_data())
            for i in range(2):
                new, opt_state, loss, metrics = step(new, opt_state, next(data), jax.random.PRNGKey(i))
                losses.append(float(loss))
                assert all(np.isfinite(float(v)) for v in metrics.values())
            cache[exp] = (task, params, new, losses)
        return cache[exp]

    return get


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_tiny_finetune_steps_and_metrics(exp, trained):
    task, before, after, losses = trained(exp)
    assert np.isfinite(losses).all()
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after))
    assert sum(changed) > len(changed) // 2
    results = task.evaluate(after)
    kind = task.config.task
    assert kind == TASK_OF[exp]
    assert task.selection_metric() == SELECTION[kind]  # train.eval_every keeps best/ by it (medjax.best_checkpoint)
    with_validation = config_lib.get_config(exp, "tiny", ["train.eval_every=2"])
    assert best_checkpoint.selection(with_validation, task) == SELECTION[kind]
    if kind == "ptunifier_vqa":
        assert results["num_closed"] + results["num_open"] == results["examples"] == 24  # 4 test images x 6 questions
        for key in ("overall", "closed", "open"):
            assert 0.0 <= results[key] <= 100.0
        assert task.model.num_outputs == task.train_set.num_answers >= 10
    elif kind == "ptunifier_classification":
        assert 0.0 <= results["auc"] <= 1.0 and 0.0 <= results["f1"] <= 1.0 and results["examples"] == 32
    elif kind == "ptunifier_nli":
        assert results["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and results["examples"] == 4
    elif kind == "ptunifier_melinda":  # i_meth = the first finding's shape: 5 classes named in sorted order
        assert task.model.num_outputs == 5 and task.train_set.classes == sorted(task.train_set.classes)
        assert results["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and results["examples"] == 4
        assert task.validate(after)["examples"] == 4  # the val split
    else:
        for prefix in ("", "itc_"):
            for way in ("ir", "tr"):
                r1, r5, r10 = (results[f"{prefix}{way}_r{k}"] for k in (1, 5, 10))
                assert 25.0 <= r5 <= r10 == 100.0 and 0.0 <= r1 <= r5  # 4 test pairs: R@5 and R@10 are 100
        val = task.validate(after)  # on the val split: recall and the loss of 1 + 3 texts per image
        assert val["examples"] == len(task.val_set) == 4 and 0.0 < val["irtr_loss"] < 5.0
        assert val["the_metric"] == pytest.approx((val["ir_r1"] + val["tr_r1"]) / 100.0 - val["irtr_loss"])
    table = task.results_table(exp, [("demo", results)])
    header = {"ptunifier_vqa": "demo Open | demo Closed | demo Overall", "ptunifier_classification": "demo AUC | demo F1",
              "ptunifier_nli": "demo Accuracy", "ptunifier_retrieval": "demo I2T R@1",
              "ptunifier_melinda": "demo Accuracy"}[kind]
    assert header in table and table.count("\n") == 2
    chance = {"ptunifier_vqa": "closed_chance", "ptunifier_classification": "auc_chance",
              "ptunifier_nli": "accuracy_chance", "ptunifier_retrieval": "tr_r1_chance",
              "ptunifier_melinda": "accuracy_chance"}[kind]
    scale = 1.0 if kind in ("ptunifier_vqa", "ptunifier_retrieval") else 100.0
    blind = f", question only {results['closed_question_only']:.2f}" if kind == "ptunifier_vqa" else ""
    assert f" (chance {scale * results[chance]:.2f}{blind})" in table  # beside its number (issue #23)
    if kind == "ptunifier_retrieval":
        assert results["tr_r1_chance"] == results["ir_r1_chance"] == 25.0 and results["tr_r5_chance"] == 100.0
    if kind == "ptunifier_classification":
        assert results["auc_chance"] == 0.5


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_prompt_pools_stay_frozen_in_finetuning(exp, trained):
    """The released protocol: the pools get no update and no weight decay while the rest trains."""
    task, before, after, _ = trained(exp)
    assert task.config.freeze_prompt_pools and not task.model.prompts_trainable
    for pool in ("visual_prompts", "textual_prompts"):
        for a, b in zip(jax.tree.leaves(before[pool]), jax.tree.leaves(after[pool])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(before["image_proj"]["kernel"]) != np.asarray(after["image_proj"]["kernel"]))


def test_load_pretrained_takes_the_backbone_and_keeps_the_head(trained):
    vqa_task, vqa_params, _, _ = trained("ptunifier_vqa")
    _, _, retrieval_trained, _ = trained("ptunifier_retrieval")
    merged = vqa_task.load_pretrained(vqa_params, jax.device_get(retrieval_trained))
    assert sorted(merged) == sorted([*retrieval_trained, "task_head"])
    for name in retrieval_trained:  # every backbone and pretraining-head leaf comes from the checkpoint
        for a, b in zip(jax.tree.leaves(merged[name]), jax.tree.leaves(retrieval_trained[name])):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(merged["task_head"]), jax.tree.leaves(vqa_params["task_head"])):
        np.testing.assert_array_equal(a, b)  # the new head keeps its initialisation
    broken = dict(retrieval_trained, vision={"position_embedding": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="does not match the model config"):
        vqa_task.load_pretrained(vqa_params, broken)


def test_param_groups_follow_the_original():
    optim = config_lib.get_config("ptunifier_vqa", "full").optim  # heads x50, multi-modal x5
    names = ("task_head", "itm_head", "mlm_decoder", "fusion_3", "visual_prompts", "image_pooler", "vision", "text",
             "modality_type")
    mults = optim_lib.lr_multipliers(optim, {n: {"kernel": 0} for n in names})
    assert [mults[f"{n}/kernel"] for n in names] == [50.0] * 3 + [5.0] * 3 + [1.0] * 3


def test_every_config_variant_loads():
    for exp, variants in (("ptunifier_vqa", ("full", "slake", "medvqa2019", "demo", "tiny")),
                          ("ptunifier_cls", ("full", "rsna", "demo", "tiny")),
                          ("ptunifier_retrieval", ("full", "demo", "tiny")), ("ptunifier_nli", ("full", "demo", "tiny")),
                          ("ptunifier_melinda", ("full", "p_meth", "i_meth_label", "p_meth_label", "demo", "tiny"))):
        for variant in variants:
            c = config_lib.get_config(exp, variant)
            assert c.task == TASK_OF[exp] and c.optim.lr == (5e-6 if variant not in ("demo", "tiny") else c.optim.lr)
            if variant not in ("demo", "tiny"):
                assert c.data.image_size == 384 and c.model.vision_width == 768
                assert c.data.val_split == "val" and 0 < c.train.eval_every <= c.train.steps  # once per epoch
    assert config_lib.get_config("ptunifier_vqa", "slake").finetune.num_answers == 222
    assert config_lib.get_config("ptunifier_retrieval", "full").train.eval_every == 2557 // 10  # 10 epochs
    melinda = {v: config_lib.get_config("ptunifier_melinda", v) for v in ("full", "p_meth", "i_meth_label", "p_meth_label")}
    assert {v: (c.data.label_column, c.finetune.num_classes) for v, c in melinda.items()} == {
        "full": ("i_meth", 85), "p_meth": ("p_meth", 45), "i_meth_label": ("i_meth_label", 15),
        "p_meth_label": ("p_meth_label", 7)}  # the original's label_size
    assert not melinda["full"].data.resized_crop and melinda["full"].data.max_text_len == 128
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.get_config("ptunifier_nli", "slake")
