"""Issue #15 (reliability), refused up front in one line: every CLI prints a data or config error as one
`error: FILE: line N: field F: what was expected` line and exits 2, with no traceback (`MEDJAX_DEBUG=1`
keeps it); an error raised in a Grain worker thread comes out as the original error. In-process calls of
each `main(argv)`, and one subprocess for the exit status and the absence of a traceback."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medjax import cli
from medjax.config import ConfigError
from medjax.data.errors import DataError
from medjax.data.pipelines.global_batches import global_batch_dataset
from medjax.errors import MedjaxInputError
from medjax.data.readers.plink import PlinkFormatError, write_plink


def _fundus_with_bad_bed(root):
    """A fundus + genotype directory whose .bed has wrong magic bytes (a chained PlinkFormatError)."""
    os.makedirs(root / "img")
    rows = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 + i, np.uint8)).save(root / "img" / f"{i}.png")
        rows.append([f"p{i}", "left", f"img/{i}.png"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["participant_id", "eye", "image_path"]] + rows)
    write_plink(str(root / "genotypes"), np.zeros((4, 8), int), [f"p{i}" for i in range(4)])
    data = bytearray((root / "genotypes.bed").read_bytes())
    data[0] = 0x00
    (root / "genotypes.bed").write_bytes(bytes(data))
    return str(root)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_every_data_and_config_error_class_is_an_input_error():
    from medjax.data.readers.arrow_ipc import ArrowFormatError
    from medjax.data.readers.ct import CTDataError
    from medjax.data.readers.wsi import SlideError
    from medjax.data.pipelines.wsi_tiles import TileCoordsError

    for kind in (DataError, ConfigError, CTDataError, SlideError, TileCoordsError, PlinkFormatError, ArrowFormatError):
        assert issubclass(kind, MedjaxInputError) and issubclass(kind, ValueError), kind


def test_chained_input_error_is_found_and_printed_on_one_line(capsys):
    def fails():
        try:
            raise PlinkFormatError("g.bed: line 1: field 'magic': expected 6c 1b\nsecond line")
        except PlinkFormatError as e:
            raise RuntimeError("wrapped by a library") from e

    assert cli.report_input_errors(fails) == cli.EXIT_INPUT_ERROR
    assert _one_error_line(capsys.readouterr().err) == "error: g.bed: line 1: field 'magic': expected 6c 1b second line"
    with pytest.raises(KeyError):  # anything else is not swallowed
        cli.report_input_errors(lambda: {}["x"])

    def bug_in_a_handler():
        try:
            raise DataError("a.csv: line 2: field 'x': expected an integer")
        except DataError:
            return {}["y"]  # a KeyError during handling: a bug, its traceback kept

    with pytest.raises(KeyError):
        cli.report_input_errors(bug_in_a_handler)


def test_error_in_a_grain_worker_thread_is_the_original_error(capsys):
    class Source:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise DataError(f"/data/img/{i}.png: line {i + 2}: field 'image_path': truncated PNG")
            return {"x": np.float32(i)}

    def read_all():
        iterator = iter(global_batch_dataset(Source(), global_batch=2, seed=0, transform=lambda e, r: e,
                                             shuffle=False, num_epochs=1, prefetch_threads=2))
        return sum(1 for _ in iterator)

    assert cli.report_input_errors(read_all) == 2
    assert _one_error_line(capsys.readouterr().err) == ("error: /data/img/5.png: line 7: field 'image_path': "
                                                       "truncated PNG")


def test_debug_variable_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(ConfigError, match="nope"):
        cli.report_input_errors(lambda: (_ for _ in ()).throw(ConfigError("unknown config key 'nope'")))


@pytest.mark.parametrize("name, argv, message", [
    ("train", ["--exp", "mrm_retina", "--variant", "tiny", "--set", "optim.lrr=1"],
     r"error: unknown config key 'optim.lrr': optim has no field 'lrr' \(did you mean lr"),
    ("train", ["--exp", "mrm_retina", "--variant", "tiny", "--set", "train.steps=two"],
     r"error: --set train.steps=two: expected a value of type int"),
    ("evaluate", ["--exp", "mrm_aptoss", "--checkpoint", "nowhere"], r"error: unknown experiment 'mrm_aptoss'"),
    ("predict", ["--exp", "universal_swin", "--params", "p", "--input", "missing.nii.gz", "--out", "o.nii.gz"],
     r"error: missing\.nii\.gz: --input file not found"),
    ("convert", ["hf", "--path", "no_such_dir", "--out", "o"], r"error: .*no_such_dir"),
    ("data", ["tile", "--slides", "no_slides", "--out", "o"], r"error: no_slides: slide directory not found"),
    ("bench", ["step", "--exp", "nope"], r"error: unknown experiment 'nope'"),
])
def test_every_cli_prints_one_line_and_returns_2(name, argv, message, capsys, tmp_path, monkeypatch):
    import importlib
    import re

    monkeypatch.chdir(tmp_path)
    module = {"train": "medjax.train", "evaluate": "medjax.evaluate", "predict": "medjax.predict",
              "convert": "medjax.convert.__main__", "data": "medjax.data.__main__",
              "bench": "medjax.bench.__main__"}[name]
    assert importlib.import_module(module).main(argv) == 2
    assert re.match(message, _one_error_line(capsys.readouterr().err))


def test_train_data_error_in_process(tmp_path, capsys):
    from medjax import train

    root = _fundus_with_bad_bed(tmp_path / "data")
    argv = ["--exp", "mrm_retina", "--variant", "tiny", "--data", root, "--workdir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "genotypes.bed" in line and "magic" in line


def test_train_subprocess_exits_2_without_traceback(tmp_path):
    root = _fundus_with_bad_bed(tmp_path / "data")
    cmd = [sys.executable, "-m", "medjax.train", "--exp", "mrm_retina", "--variant", "tiny", "--data", root,
           "--workdir", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_VARIABLE}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "During handling" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "genotypes.bed" in errors[0], proc.stderr
