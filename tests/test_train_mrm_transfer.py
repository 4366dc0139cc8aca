"""MRM's RFMiD and PALM transfers end to end through the CLIs (tiny variants on the test demo): fine-tuning keeps
the best-validation checkpoint, `evaluate` tests it and prints the transfer table; the table layout, the
pretraining labels and the metrics against sklearn / ContIG's formulas."""
import json
import os

import numpy as np
import pytest

from medjax import best_checkpoint as best_lib
from medjax import evaluate, train
from medjax.checkpoint import restore_params
from medjax.metrics.segmentation import pooled_dice
from medjax.tasks.fundus_multilabel import multilabel_aucs
from medjax.tasks.fundus_transfer import fraction_subset, pretraining_label, transfer_column_label, transfer_table

SINGLE = ["--set", "mesh.num_devices=1", "--set", "train.steps=2", "--set", "train.eval_every=2"]


@pytest.fixture(scope="module")
def transfer_demo(demo_roots):
    return demo_roots("fundus_transfer")


def finetune_and_evaluate(exp, data, workdir):
    assert train.main(["--exp", exp, "--variant", "tiny", "--data", data, "--workdir", workdir,
                       "--set", "data.label_fraction=0.5", *SINGLE]) == 0
    best = best_lib.best_dir(workdir)
    record = best_lib.read_best(best)
    assert (record["metric"], record["mode"], record["step"]) == ("loss", "min", 2)  # ContIG's valid_loss
    assert evaluate.main(["--exp", exp, "--checkpoint", workdir]) == 0
    table = open(os.path.join(workdir, "results.md")).read()
    return table, json.load(open(os.path.join(workdir, "results.json")))[0], best


def test_rfmid_finetune_and_table(transfer_demo, tmp_path):
    table, results, _ = finetune_and_evaluate("mrm_rfmid", os.path.join(transfer_demo, "rfmid"), str(tmp_path))
    assert table.splitlines()[0] == "| RFMiD labels | scratch auc_macro | scratch auc_micro |"
    assert table.splitlines()[2].startswith("| 50% | ")
    assert results["column"] == "scratch 50%"
    assert 0.0 <= results["auc_macro"] <= 1.0 and 0.0 <= results["auc_micro"] <= 1.0
    assert "auc/DR" in results and "auc/Disease_Risk" not in results  # ContIG's 43 labels
    assert results["examples"] == 8


def test_palm_finetune_and_table(transfer_demo, tmp_path):
    table, results, best = finetune_and_evaluate("mrm_palm", os.path.join(transfer_demo, "palm"), str(tmp_path))
    assert table.splitlines()[0] == "| PALM labels | scratch dice | scratch dice_disc | scratch dice_atrophy |"
    for key in ("dice", "dice_disc", "dice_atrophy", "dice_contig"):
        assert 0.0 <= results[key] <= 1.0
    # BatchNorm's running averages: set by the training steps (post_update), saved with the params
    stats = restore_params(best)["batch_stats"]
    assert np.abs(stats["stem_bn"]["mean"]).max() > 0 and not np.allclose(stats["stem_bn"]["var"], 1.0)


def test_transfer_table_layout():
    columns = [("MRM 1%", {"auc_macro": 0.7}), ("MAE 1%", {"auc_macro": 0.6}), ("MRM 100%", {"auc_macro": 0.9}),
               ("MRM 10%", {"auc_macro": 0.8})]
    assert transfer_table("RFMiD", columns, ("auc_macro",)).splitlines() == [
        "| RFMiD labels | MRM auc_macro | MAE auc_macro |", "|---|---|---|",
        "| 1% | 70.00 | 60.00 |", "| 10% | 80.00 | - |", "| 100% | 90.00 | - |"]


def test_pretraining_labels(tmp_path):
    for name, task in (("mrm", "mrm"), ("mae", "mrm_mae"), ("other", "universal")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({"task": task}))
    assert pretraining_label({"init": str(tmp_path / "mrm")}) == "MRM"
    assert pretraining_label({"init": str(tmp_path / "mae")}) == "MAE"
    assert pretraining_label({"init": str(tmp_path / "other")}) == "other"
    assert pretraining_label({}) == "scratch"
    assert transfer_column_label({"init": str(tmp_path / "mae"), "data": {"label_fraction": 0.1}}, "x") == "MAE 10%"


def test_fraction_subset():
    rows = fraction_subset(200, 0.1, 42)
    assert len(rows) == 20 and len(set(rows)) == 20 and list(rows) == sorted(rows)
    assert list(fraction_subset(200, 0.1, 42)) == list(rows) and len(fraction_subset(50, 0.01, 0)) == 1
    assert list(fraction_subset(5, 1.0, 0)) == [0, 1, 2, 3, 4]


def test_multilabel_aucs_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.3).astype(np.float32)
    labels[:, 4] = 0  # a label without positives: left out of the macro mean, as sklearn cannot score it
    scores = rng.random((40, 5)) + 0.5 * labels
    aucs = multilabel_aucs(labels, scores, ["a", "b", "c", "d", "e"])
    assert aucs["auc_micro"] == pytest.approx(roc_auc_score(labels, scores, average="micro"))
    assert aucs["auc_macro"] == pytest.approx(roc_auc_score(labels[:, :4], scores[:, :4], average="macro"))
    assert "auc/e" not in aucs and aucs["auc/a"] == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]))


def test_pooled_dice_is_contigs():
    rng = np.random.default_rng(1)
    y, p = (rng.random((3, 8, 8, 2)) < 0.3).astype(np.float32), rng.random((3, 8, 8, 2))
    contig = np.sum(p.ravel() * y.ravel()) * 2.0 / (np.sum(p.ravel()) + np.sum(y.ravel()))  # ContIG's dice()
    assert pooled_dice(p, y) == pytest.approx(contig)
    assert np.isnan(pooled_dice(np.zeros(3), np.zeros(3)))
