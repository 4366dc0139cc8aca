"""UniMedI end to end on the X-ray + CT report demo (PNG + NIfTI + JSONL + local tokenizer): a mixed 2D/3D batch
trains through the Trainer and evaluates; 2D-only and 3D-only batches give finite losses whose gradients reach
only the tokenizer they use; the EMA teacher update; bad manifests refused naming file, line and field."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.data.errors import DataError
from medjax.tasks import build_task
from medjax.tasks.unimedi import UniMedITask
from medjax.trainer import Trainer

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def demo(demo_roots):
    return demo_roots("xray_ct_reports")


def tiny(demo, *overrides):
    return config_lib.get_config("unimedi", "tiny", [f"data.dir={demo}", "mesh.num_devices=1", *overrides])


def test_mixed_batches_train_and_evaluate(demo, tmp_path):
    config = tiny(demo, "train.steps=2", "data.eval_split=train")  # the test demo's val split is 2 CTs
    task = build_task(config, **QUIET)
    assert isinstance(task, UniMedITask) and (task.batch_2d, task.batch_3d) == (4, 4)
    batch = next(iter(task.train_data()))
    assert batch["images"].shape == (4, 32, 32, 3) and batch["volumes"].shape == (4, 8, 32, 32, 1)
    assert batch["image_input_ids"].shape == batch["volume_input_ids"].shape == (4, 12)
    assert -1.0 <= batch["volumes"].min() < batch["volumes"].max() <= 1.0
    trainer = Trainer(config, task, str(tmp_path))
    result = trainer.run()
    assert result["step"] == 2 and np.isfinite(result["losses"]).all()
    # random init: L_vl ~ ln(8) and each DINO term ~ ln(64) (uniform student vs sharp targets: <= ln K / tau ratio)
    assert 2.0 < result["losses"][0] < 30.0
    results = task.evaluate(jax.device_get(trainer.state["params"]))
    for key in ("2d_tr_r1", "2d_ir_r5", "3d_tr_r1", "3d_ir_r5", "2d_zero_shot_auc", "3d_zero_shot_auc",
                "2d_probe100_auc", "3d_probe100_accuracy"):
        assert key in results and np.isfinite(results[key]), key
    assert 0.0 <= results["2d_tr_r1"] <= results["2d_tr_r5"] <= 100.0
    table = task.results_table("unimedi", [("tiny", results)])
    assert "retrieval" in table and "Linear classification" in table and "| medjax unimedi (tiny) |" in table


@pytest.mark.parametrize("fraction, used, unused", [(1.0, "patch_embed", "volume_embed"),
                                                     (0.0, "volume_embed", None)])
def test_one_kind_batches_train(demo, fraction, used, unused):
    task = build_task(tiny(demo, f"data.fraction_2d={fraction}"), **QUIET)
    batch = next(iter(task.train_data()))
    assert ("images" in batch) == (fraction > 0) and ("volumes" in batch) == (fraction < 1)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))  # jitted: one compile, not one per op
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: task.loss_fn(p, b, jax.random.PRNGKey(1), True)[0]))
    loss, grads = loss_and_grad(params, batch)
    assert np.isfinite(float(loss))
    vision = grads["student"]["vision"]
    norm = lambda tree: float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(tree)))  # noqa: E731
    found = vision[used] if used in vision else vision["encoder"][used]
    assert norm(found) > 0.0
    if unused is not None:  # 2D-only: the T_3D tokenizer gets no gradient
        assert norm(vision[unused]) == 0.0 and norm(vision["volume_pos_embed"]) == 0.0
    assert norm(grads["teacher"]) == 0.0  # the teacher is reached only by EMA


def test_ema_teacher_update(demo):
    task = build_task(tiny(demo, "train.steps=10"), **QUIET)
    params = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), params)
    new, metrics = task.post_update(params, {}, 5)
    m = float(metrics["teacher_momentum"])
    assert m == pytest.approx(1 - (1 - 0.996) * (np.cos(np.pi * 5 / 10) + 1) / 2)
    for side in ("vision", "dino_head"):
        expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, params["teacher"][side], params["student"][side])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                     new["teacher"][side], expected)
    assert new["student"] is params["student"]


def test_bad_manifests_are_refused(demo, tmp_path):
    root = tmp_path / "data"
    for sub in ("xray", "ct"):
        os.makedirs(root / sub)
    os.symlink(os.path.join(demo, "tokenizer"), root / "tokenizer")
    os.symlink(os.path.join(demo, "xray", "images"), root / "xray" / "images")
    with open(os.path.join(demo, "xray", "manifest.jsonl")) as f:
        (root / "xray" / "manifest.jsonl").write_text(f.read())
    rows = [{"volume": "volumes/missing.nii.gz", "captions": ["No nodule."], "split": "train"}]
    (root / "ct" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task(tiny(str(root)), **QUIET)
    with pytest.raises(DataError, match=r"ct/manifest.jsonl: line 1: field 'volume': file .*missing.nii.gz not found"):
        task.volume_set("train")
    (root / "ct" / "manifest.jsonl").write_text(json.dumps({"volume": "v.nii.gz", "split": "train"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: missing field 'captions'"):
        task.volume_set("train")
