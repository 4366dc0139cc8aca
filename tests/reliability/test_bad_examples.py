"""Issue #15 (reliability): `data.on_bad_example=error|skip`. A file failing mid-run names the file whatever
the reader; with `skip` it is replaced deterministically (batches a pure function of (seed, step), so a
resumed run is exact) and counted in the log and metrics.jsonl (`data/skipped`)."""
import json

import numpy as np
import pytest

from medjax.data.pipelines.bad_examples import SKIPPED_KEY, replacement_index
from medjax.data.errors import DataError
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.trainer import SKIPPED_METRIC, Trainer
from tests.toy_task import ToyTask, toy_config

BAD = (3, 11)


class Flaky:
    """16 examples; those in BAD raise a reader error."""

    def __init__(self, n=16):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in BAD:
            raise DataError(f"/data/img/{i}.png is not a readable image (OSError: broken data stream)")
        return {"x": np.float32(i)}

    def describe(self, i):
        return f"/data/manifest.csv: line {i + 2}: field 'image_path' (/data/img/{i}.png)"


def _batches(source, count, policy, state=None, start=0):
    ds = global_batch_dataset(source, global_batch=4, seed=7, transform=lambda e, r: {"x": e["x"] + r.random()},
                              on_bad_example=policy, prefetch_threads=2)
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(start, count)]
    return out, it


def test_error_policy_names_the_file_even_for_a_non_reader_error():
    class Buggy(Flaky):
        def __getitem__(self, i):
            if i == 6:
                raise ZeroDivisionError("division by zero")
            return super().__getitem__(i) if i not in BAD else {"x": np.float32(i)}

    with pytest.raises(DataError, match=r"manifest\.csv: line 8: field 'image_path' \(/data/img/6\.png\): "
                                        r"ZeroDivisionError: division by zero"):
        _batches(Buggy(), 4, "error")
    with pytest.raises(DataError, match=r"/data/img/(3|11)\.png is not a readable image"):
        _batches(Flaky(), 8, "error")


def test_skip_replaces_deterministically_and_counts(capfd):
    batches, _ = _batches(Flaky(), 8, "skip")
    warned = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    skipped = sum(int(b[SKIPPED_KEY].sum()) for b in batches)
    # 32 positions = 2 epochs of 16: each bad index met twice, a replacement drawn may be bad too
    assert skipped == len(warned) >= 4
    assert any("data.on_bad_example=skip: skipping /data/img/3.png is not a readable image" in w for w in warned)
    again, _ = _batches(Flaky(), 8, "skip")
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a[SKIPPED_KEY], b[SKIPPED_KEY])
    assert all(b["x"].shape == (4,) for b in batches)
    values = np.concatenate([b["x"] for b in batches])
    assert not np.isin(np.floor(values), BAD).any()  # no bad example's value reached a batch
    assert replacement_index(7, 5, 1, 16) == replacement_index(7, 5, 1, 16)


def test_skip_resumes_exactly():
    full, _ = _batches(Flaky(), 8, "skip")
    _, it = _batches(Flaky(), 3, "skip")
    resumed, _ = _batches(Flaky(), 8, "skip", state=it.get_state(), start=3)
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a[SKIPPED_KEY], b[SKIPPED_KEY])


class FlakyToyTask(ToyTask):
    """The trainer's toy regression with two unreadable examples, data.on_bad_example=skip."""

    def __init__(self, config, log=print, run=None):
        super().__init__(config, log, run)
        examples = self.examples

        class Source:
            def __len__(self):
                return len(examples)

            def __getitem__(self, i):
                if i in BAD:
                    raise DataError(f"/data/{i}.npy: unreadable")
                return examples[i]

        self.source = Source()

    def train_data(self):
        noise = lambda ex, rng: {"x": ex["x"], "y": ex["y"]}
        return global_batch_dataset(self.source, global_batch=self.global_batch, seed=int(self.config.seed),
                                    transform=noise, on_bad_example=self.on_bad_example)


def test_trainer_logs_skipped_examples_in_metrics_jsonl(tmp_path):
    config = toy_config(steps=4, batch_size=8, log_every=2, checkpoint_every=100)
    config.data.size = 16  # 4 steps x 8 = 2 epochs: each bad example met twice
    config.data.on_bad_example = "skip"
    result = Trainer(config, FlakyToyTask(config, log=lambda *_: None), str(tmp_path)).run()
    assert result["step"] == 4 and np.isfinite(result["losses"]).all()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [r[SKIPPED_METRIC] for r in rows if SKIPPED_METRIC in r]
    expected = sum(int(b[SKIPPED_KEY].sum()) for b in _toy_batches(config, 4))
    assert len(logged) == 2 and sum(logged) == expected >= 4


def _toy_batches(config, count):
    it = iter(FlakyToyTask(config, log=lambda *_: None).train_data())
    return [next(it) for _ in range(count)]
