"""UNI / DINOv2 tiny end to end through `python -m medjax.train`: finite losses, the teacher moved by EMA of
the student, the last layer frozen for the first epoch, centers and teacher temperature updated."""
import json
import math
import os

import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.checkpoint import restore_params
from medjax.data.demo.wsi import make_wsi_demo
from medjax.data.tiling.coords import tile_slides
from medjax.data.tiling.tissue import PRESETS
from medjax.data.readers.wsi import list_slides
from medjax.tasks.uni_pretrain import UNIPretrainTask


@pytest.fixture(scope="module")
def wsi_tiles(tmp_path_factory):
    """One small demo slide in `slides/`, tiled into `coords/` (the layout `--data` expects)."""
    root = str(tmp_path_factory.mktemp("uni_wsi"))
    make_wsi_demo(root, num_slides=1, size=1536)
    results = tile_slides(list_slides(os.path.join(root, "slides")), os.path.join(root, "coords"), params=PRESETS["demo"],
                          stream=open(os.devnull, "w"))
    assert results[0].num_tiles >= 4
    return root


def test_tiny_trains_and_teacher_follows_student_by_ema(wsi_tiles, tmp_path):
    from medjax import train

    workdir = str(tmp_path / "run")
    overrides = ["mesh.num_devices=4", "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=4"]
    assert train.main(["--exp", "uni_vitl16", "--variant", "tiny", "--data", wsi_tiles, "--workdir", workdir,
                       *[a for o in overrides for a in ("--set", o)]]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"step"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss"))
        assert r["masked_patches"] > 0
    assert rows[0]["teacher_temp"] == pytest.approx(0.04) and rows[1]["teacher_temp"] == pytest.approx(0.07)

    config = config_lib.get_config("uni_vitl16", "tiny", [f"data.dir={wsi_tiles}", *overrides])
    task = UNIPretrainTask(config, log=lambda *_: None)
    ckpt = lambda step: restore_params(os.path.join(workdir, "checkpoints", str(step)))  # noqa: E731
    p2, p3 = ckpt(2), ckpt(3)
    # The update of step index 2: teacher_3 = m_2 teacher_2 + (1 - m_2) student_3, leaf by leaf.
    m = float(task.momentum_fn(2))
    expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, p2["teacher"], p3["student"])
    for got, want in zip(jax.tree.leaves(p3["teacher"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    moved = [np.abs(t3 - t2).max() for t2, t3 in zip(jax.tree.leaves(p2["teacher"]), jax.tree.leaves(p3["teacher"]))]
    assert max(moved) > 0
    # The student trains (lr > 0 from step 1); its last layer is frozen for the first epoch (2 steps), and
    # as the teacher started equal to the student, the teacher's last layer is still the same then.
    last = lambda p, side: p[side]["dino_head"]["last_layer"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(last(p2, "student"), last(p2, "teacher"), rtol=1e-6)
    assert np.abs(last(p3, "student") - last(p2, "student")).max() > 0
    block = lambda p: p["student"]["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # noqa: E731
    assert np.abs(block(p3) - block(p2)).max() > 0
    assert np.abs(p3["center"]).max() > 0 and np.isfinite(p3["center"]).all()
    assert float(p3["teacher_temp"]) == pytest.approx(0.07)
