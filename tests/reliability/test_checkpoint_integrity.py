"""Corrupted, emptied and unrecorded checkpoint steps (issue #15): the checksums recorded after each save are
verified on restore, and a resume falls back to the newest step that verifies, saying which step it skipped
and why; the resumed run ends exactly where an uninterrupted one does."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from medjax.checkpoint import CheckpointError, restore_params
from medjax.checkpoint_integrity import CHECKSUMS, verify_checksums
from medjax.trainer import Trainer
from tests.toy_task import ToyTask, toy_config


def _config(**train):
    config = toy_config(**dict(dict(steps=6, checkpoint_every=2), **train))
    config.mesh.num_devices = 1
    return config


def run(workdir, **train):
    config = _config(**train)
    return Trainer(config, ToyTask(config), str(workdir)).run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints 2, 4, 6) and its final params."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir)
    return workdir, result, restore_params(str(workdir))


def _copy(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    return workdir


def _biggest_state_file(step_dir):
    files = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
    return max(files, key=os.path.getsize)


def _flip_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
        f.seek(0)
        f.write(data)


def _same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_every_saved_step_records_checksums_that_verify(reference):
    workdir = reference[0]
    for step in (2, 4, 6):
        step_dir = os.path.join(workdir, "checkpoints", str(step))
        with open(os.path.join(step_dir, CHECKSUMS)) as f:
            files = json.load(f)["files"]
        assert "state/_METADATA" in files and "data/process_0-of-1.json" in files
        assert verify_checksums(step_dir) is None


@pytest.mark.parametrize("damage", ["flipped bytes", "emptied step", "missing state item"])
def test_a_damaged_latest_step_is_skipped_and_the_resume_is_exact(reference, tmp_path, capsys, damage):
    workdir = _copy(reference, tmp_path)
    step6 = os.path.join(workdir, "checkpoints", "6")
    if damage == "flipped bytes":
        _flip_bytes(_biggest_state_file(step6))
    elif damage == "emptied step":
        for name in os.listdir(step6):
            path = os.path.join(step6, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    else:
        shutil.rmtree(os.path.join(step6, "state"))
    capsys.readouterr()
    result = run(workdir)  # steps=6 again: step 6 is redone from step 4
    out = capsys.readouterr().out
    assert "checkpoint: skipping step 6: " in out, out
    reason = out.split("checkpoint: skipping step 6: ")[1].splitlines()[0]
    assert {"flipped bytes": "does not match its saved SHA-256 (corrupted)", "emptied step": "no state item",
            "missing state item": "state/_METADATA is missing"}[damage] in reason
    assert f"moved to {workdir}/skipped_checkpoints/6" in reason
    assert "resumed from" in out and "at step 4" in out
    assert result["step"] == 6 and result["losses"] == reference[1]["losses"][4:]
    _same_params(restore_params(str(workdir)), reference[2])
    assert verify_checksums(step6) is None  # the redone step 6, recorded afresh


def test_restore_params_passes_over_a_corrupted_step_and_refuses_a_corrupted_step_dir(reference, tmp_path, capsys):
    workdir = _copy(reference, tmp_path)
    _flip_bytes(_biggest_state_file(os.path.join(workdir, "checkpoints", "6")))
    expected = restore_params(str(os.path.join(reference[0], "checkpoints", "4")))
    _same_params(restore_params(str(workdir)), expected)
    assert "passing over step 6" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="checkpoints/6: state/.* does not match its saved SHA-256"):
        restore_params(str(os.path.join(workdir, "checkpoints", "6")))


def test_a_step_saved_without_checksums_still_restores_with_a_warning(reference, tmp_path, capsys):
    workdir = _copy(reference, tmp_path)
    os.remove(os.path.join(workdir, "checkpoints", "6", CHECKSUMS))  # as an older medjax wrote it
    result = run(workdir, steps=7)
    out = capsys.readouterr().out
    assert "step 6 has no medjax_checksums.json" in out and "restoring it unverified" in out
    assert "at step 6" in out and result["step"] == 7 and len(result["losses"]) == 1


def test_no_step_that_verifies_is_a_clear_error(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    for step in (2, 4, 6):
        _flip_bytes(_biggest_state_file(os.path.join(workdir, "checkpoints", str(step))))
    with pytest.raises(CheckpointError, match="no checkpoint step verifies"):
        run(workdir)
    assert sorted(os.listdir(workdir / "skipped_checkpoints")) == ["2", "4", "6"]  # moved aside, never deleted
