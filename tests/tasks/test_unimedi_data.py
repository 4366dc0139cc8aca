"""UniMedI's mixed 2D/3D pipeline (two `global_batch_dataset` streams zipped): the 2D:3D ratio of every batch,
an exact resume from the iterator state saved in an Orbax checkpoint, and per-process shares whose union (in
process order) is the single-process global batch."""
import numpy as np
import pytest

from medjax import config as config_lib
from medjax.checkpoint import Checkpointer
from medjax.data.pipelines.bad_examples import SKIPPED_KEY
from medjax.tasks import build_task
from medjax.tasks.unimedi import merge_kinds

QUIET = dict(log=lambda *_: None)
KEYS_2D = ("images", "image_input_ids", "image_attention_mask")
KEYS_3D = ("volumes", "volume_input_ids", "volume_attention_mask")


@pytest.fixture(scope="module")
def demo(demo_roots):
    return demo_roots("xray_ct_reports")


def task_for(demo, *overrides):
    config = config_lib.get_config("unimedi", "tiny", [f"data.dir={demo}", "mesh.num_devices=1",
                                                       "data.prefetch_threads=0", *overrides])
    return build_task(config, **QUIET)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("fraction, sizes", [(0.25, (2, 6)), (0.75, (6, 2))])
def test_the_sampler_ratio_sets_each_batch(demo, fraction, sizes):
    task = task_for(demo, f"data.fraction_2d={fraction}")
    batch = next(iter(task.train_data()))
    assert (batch["images"].shape[0], batch["volumes"].shape[0]) == sizes
    assert batch["image_input_ids"].shape[0] == sizes[0] and batch["volume_attention_mask"].shape[0] == sizes[1]


def test_resume_from_a_checkpoint_gives_the_same_batches(demo, tmp_path):
    task = task_for(demo)  # 4 + 4 per batch; the test demo's train split: 19 X-rays (4 batches), 12 CTs (3)
    uninterrupted = iter(task.train_data())
    expected = [next(uninterrupted) for _ in range(9)]  # past an epoch of both kinds
    stopped = iter(task.train_data())
    for _ in range(5):
        next(stopped)
    checkpointer = Checkpointer(str(tmp_path), interval=1, keep=1, async_save=False)
    checkpointer.save(5, {"step": np.full((), 5, np.int32)}, stopped)
    checkpointer.wait()
    next(stopped)  # moves on after the save: the restore must not see this
    resumed = iter(task_for(demo).train_data())
    state = checkpointer.restore({"step": np.zeros((), np.int32)}, resumed)
    assert int(state["step"]) == 5
    for want in expected[5:]:
        assert_same(next(resumed), want)
    assert not np.array_equal(expected[0]["images"], expected[1]["images"])  # the batches do differ


def test_process_shares_make_the_global_batch(demo):
    task = task_for(demo)
    whole = iter(task.mixed_batches(0, 1))
    shares = [iter(task.mixed_batches(p, 2)) for p in range(2)]
    for _ in range(4):  # across the 3D stream's epoch boundary
        want = next(whole)
        parts = [next(s) for s in shares]
        for k in KEYS_2D + KEYS_3D:
            assert parts[0][k].shape[0] == parts[1][k].shape[0] == want[k].shape[0] // 2, k
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k], err_msg=k)
        first, second = (p["volumes"].reshape(2, -1) for p in parts)
        assert not any(np.array_equal(a, b) for a in first for b in second)  # disjoint: different CTs
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        task.mixed_batches(0, 3)


def test_skip_counts_of_both_kinds_are_kept():
    parts = [{"images": np.zeros((2, 1)), SKIPPED_KEY: np.array([0, 1], np.int32)},
             {"volumes": np.zeros((3, 1)), SKIPPED_KEY: np.array([2, 0, 0], np.int32)}]
    merged = merge_kinds(parts)
    assert set(merged) == {"images", "volumes", SKIPPED_KEY}
    np.testing.assert_array_equal(merged[SKIPPED_KEY], [0, 1, 2, 0, 0])
    assert sorted(merge_kinds([{"images": 1}, {"volumes": 2}])) == ["images", "volumes"]
