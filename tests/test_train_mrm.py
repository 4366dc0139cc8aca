"""MRM end to end through the CLIs: every experiment's tiny variant, SIGTERM resume,
pretraining -> APTOS fine-tuning -> evaluation tables. (Sharded runs vs one device: the trainer in
tests/test_trainer.py, every model under every preset in tests/parallel/test_presets.py.)"""
import json
import os
import signal

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import train
from medjax.checkpoint import restore_params
from medjax.metric_writer import MetricWriter
from medjax.tasks import build_task
from medjax.trainer import Trainer
from tests.experiment_data import tiny_data_overrides

QUIET = dict(log=lambda *_: None)


SINGLE_DEVICE = ["mesh.num_devices=1", "train.steps=2"]  # the APTOS CLI run and the Trainer below: compiled once
RETINA = ["--set", "mesh.num_devices=1"]  # tiny: 4 steps, log every step, a checkpoint every 2


def tiny_config(exp, data, *overrides):
    sub = "aptos" if exp == "mrm_aptos" else ""
    return config_lib.get_config(exp, "tiny", [f"data.dir={os.path.join(data, sub)}", *SINGLE_DEVICE, *overrides])


@pytest.mark.parametrize("exp", config_lib.available_experiments())
def test_every_experiment_tiny_feeds_its_model(exp, demo_roots, tmp_path):
    """Every experiment's tiny variant builds its task on a demo of its data kind, and the pipeline's
    batches have exactly the keys, per-example shapes and dtypes the model was initialised with."""
    base = config_lib.get_config(exp, "tiny")
    config = config_lib.get_config(exp, "tiny", [*tiny_data_overrides(base, demo_roots, str(tmp_path)), *SINGLE_DEVICE])
    task = build_task(config, **QUIET)
    batch, init = next(iter(task.train_data())), task.init_batch()
    assert sorted(batch) == sorted(init), exp
    for key in init:
        # the global batch, or one kind's share of it where a batch mixes kinds (UniMedI: 2D + 3D)
        assert np.shape(batch[key])[0] == np.shape(init[key])[0] <= int(config.train.batch_size), (exp, key)
        assert np.shape(batch[key])[1:] == np.shape(init[key])[1:], (exp, key)
        assert np.asarray(batch[key]).dtype == np.asarray(init[key]).dtype, (exp, key)


def read_losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def pretrained(fundus_demo, tmp_path_factory):
    """mrm_retina tiny (4 steps, checkpoints at 2 and 4) through the train CLI, uninterrupted: (workdir, losses by
    step). The SIGTERM run below uses the same config, so its step is the same compiled executable."""
    workdir = str(tmp_path_factory.mktemp("mrm_pretrain"))
    assert train.main(["--exp", "mrm_retina", "--variant", "tiny", "--data", fundus_demo, "--workdir", workdir,
                       *RETINA]) == 0
    return workdir, read_losses(workdir)


def test_mrm_retina_tiny_trains(pretrained):
    """(The other families' tiny training runs: tests/test_train_{universal,uni,ptunifier}.py; APTOS below.)"""
    workdir, losses = pretrained
    assert sorted(losses) == [1, 2, 3, 4] and np.isfinite(list(losses.values())).all()
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [2, 4]
    # Relation matching is not negligible (issue #23): with the pooled features centred over the batch
    # (model.relation_similarity="centered_cosine") both terms are >= 1e-2 at every step (measured 0.04-0.13,
    # 1-3% of the loss); the plain cosines of near-parallel pooled features gave ~1e-3.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [row for row in map(json.loads, f) if "loss" in row]
    for row in rows:
        assert min(row["self_matching"], row["cross_matching"]) > 1e-2, row


def test_sigterm_saves_and_resumes_exactly(fundus_demo, pretrained, tmp_path, capsys):
    """SIGTERM after step 1 (the trainer's real handler: the signal is sent to this process) saves a checkpoint at
    step 1 and exits cleanly; rerunning the same command resumes there, and steps 2-4 repeat the uninterrupted
    run's losses exactly: same params, optimizer state, RNG and data iterator (the same batches in the same order).
    (A SIGTERM to a separate process, multi-process: tests/parallel/test_multihost.py.)"""
    _, uninterrupted = pretrained
    workdir = str(tmp_path / "run")
    argv = ["--exp", "mrm_retina", "--variant", "tiny", "--data", fundus_demo, "--workdir", workdir, *RETINA]
    write = MetricWriter.write

    def write_then_preempt(self, step, metrics):
        write(self, step, metrics)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetricWriter, "write", write_then_preempt)
        assert train.main(argv) == 0
    output = capsys.readouterr().out
    assert "SIGTERM: saving a checkpoint at step 1 and exiting" in output and "stopped by SIGTERM" in output
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [1]
    assert train.main(argv) == 0
    assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step 1" in capsys.readouterr().out
    resumed = read_losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == uninterrupted  # bit for bit, steps 2-4 computed after the restore


def test_pretrain_finetune_evaluate(fundus_demo, pretrained, tmp_path):
    """APTOS tiny fine-tuned from the pretraining run through the CLIs, then evaluated."""
    from medjax import evaluate

    pre, fine = pretrained[0], str(tmp_path / "fine")
    single = [a for o in SINGLE_DEVICE for a in ("--set", o)]
    assert train.main(["--exp", "mrm_aptos", "--variant", "tiny", "--data", os.path.join(fundus_demo, "aptos"),
                       "--workdir", fine, "--set", f"init={pre}", "--set", "data.label_fraction=0.5", *single]) == 0
    losses = read_losses(fine)
    assert sorted(losses) == [1, 2] and np.isfinite(list(losses.values())).all()
    # init= copies the pretrained image encoder into the classifier (checked before any update).
    config = tiny_config("mrm_aptos", fundus_demo, f"init={pre}")
    trainer = Trainer(config, build_task(config, **QUIET), str(tmp_path / "fresh"))
    assert trainer.restore_or_init(None).startswith("initialised from")
    pretrained_encoder = restore_params(pre)["image_encoder"]
    loaded = jax.device_get(trainer.state["params"]["encoder"])
    for a, b in zip(jax.tree.leaves(pretrained_encoder), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    trainer.checkpointer.close()
    assert evaluate.main(["--exp", "mrm_aptos", "--checkpoint", fine]) == 0
    table = open(os.path.join(fine, "results.md")).read()
    assert "| Method | 50% auc | 50% kappa | 50% accuracy |" in table
    results = json.load(open(os.path.join(fine, "results.json")))[0]
    assert 0.0 <= results["auc"] <= 1.0 and -1.0 <= results["kappa"] <= 1.0 and results["examples"] > 0


def test_per_chromosome_genotypes_through_the_config(fundus_demo, tmp_path):
    """`--set data.genotypes='ukb_chr{c}_v2'` (ContIG's one PLINK file set per chromosome) reaches the reader from
    the experiment config: each item's genome is every s-th SNP within each chromosome's file (ContIG's
    `slice(0, None, s)` per file), in chromosome order, dosages as count_A1=False."""
    from medjax.data.readers.plink import read_plink, write_plink

    root = tmp_path / "ukb"
    root.mkdir()
    (root / "manifest.csv").write_text(open(os.path.join(fundus_demo, "manifest.csv")).read())
    os.symlink(os.path.join(fundus_demo, "images"), root / "images")
    merged = read_plink(os.path.join(fundus_demo, "genotypes"))
    files = {1: merged.genotypes[:, :70].astype(int), 2: merged.genotypes[:, 70:130].astype(int)}
    for c, genotypes in files.items():
        write_plink(str(root / f"ukb_chr{c}_v2"), genotypes, merged.iids, chromosomes=[c] * genotypes.shape[1])
    config = config_lib.get_config("mrm_retina", "tiny", [f"data.dir={root}", "data.genotypes=ukb_chr{c}_v2",
                                                          "data.chromosomes=[1, 2]", "data.snp_stride=3",
                                                          *SINGLE_DEVICE])
    task = build_task(config, **QUIET)
    row = merged.iids.index(task.dataset.participant_ids[0])
    expected = np.concatenate([files[c][row, slice(0, None, 3)] for c in (1, 2)])
    np.testing.assert_array_equal(task.dataset[0]["genome"], expected)
    assert task.dataset.num_snps == len(range(0, 70, 3)) + len(range(0, 60, 3))
