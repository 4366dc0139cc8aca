"""`python -m medjax.convert ... --out OUT` checks OUT before writing anything and writes into a temporary
directory renamed into place (issue #15: an existing OUT's class_embeddings.npy was overwritten before the
refusal). The converter itself is replaced by a fake here (no torch needed): what is tested is the writing."""
import json
import os

import numpy as np
import pytest

from medjax.checkpoint import restore_params
from medjax.checkpoint_integrity import verify_checksums
from medjax.convert import __main__ as cli
from medjax.convert.torch_io import KeyReport
from medjax.provenance import PROVENANCE

EMBEDDING = np.arange(6, dtype=np.float32).reshape(2, 3)
PARAMS = {"controller": {"kernel": np.ones((2, 2), np.float32)}}


@pytest.fixture
def fake_universal(monkeypatch):
    calls = []

    def convert(args):
        calls.append(args.torch)
        if args.torch.endswith("broken.pth"):
            raise ValueError(f"{args.torch}: not a checkpoint")
        args.extra_files = {"class_embeddings.npy": EMBEDDING}
        return PARAMS, KeyReport(), "\nwrote the class text embeddings"

    monkeypatch.setattr(cli, "_universal", convert)
    return calls


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_an_existing_out_is_refused_before_anything_is_written(tmp_path, fake_universal, capsys):
    out = tmp_path / "params"
    out.mkdir()
    np.save(out / "class_embeddings.npy", np.full((2, 3), 7, np.float32))
    before = (out / "class_embeddings.npy").read_bytes()
    assert cli.main(["universal", "--torch", str(tmp_path / "u.pth"), "--out", str(out)]) == 2  # an input error: one line, exit 2 (medjax.cli)
    assert f"--out {out} already exists" in capsys.readouterr().err
    assert (out / "class_embeddings.npy").read_bytes() == before and os.listdir(out) == ["class_embeddings.npy"]
    assert fake_universal == []  # refused before converting
    assert not _leftovers(tmp_path)


def test_a_new_out_gets_params_embeddings_checksums_and_provenance(tmp_path, fake_universal):
    out = tmp_path / "params"
    assert cli.main(["universal", "--torch", str(tmp_path / "u.pth"), "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out / "class_embeddings.npy"), EMBEDDING)
    np.testing.assert_array_equal(restore_params(str(out))["controller"]["kernel"], PARAMS["controller"]["kernel"])
    with open(out / PROVENANCE) as f:
        record = json.load(f)
    assert record["converted_by"] == "python -m medjax.convert universal"
    assert record["source"] == str(tmp_path / "u.pth") and record["options"]["backbone"] == "swinunetr"
    assert verify_checksums(str(out)) is None and not _leftovers(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is no conversion to protect: replaced
    assert cli.main(["universal", "--torch", str(tmp_path / "u.pth"), "--out", str(empty)]) == 0
    assert sorted(os.listdir(empty)) == sorted(os.listdir(out))


def test_a_failed_conversion_or_write_leaves_no_out(tmp_path, fake_universal, monkeypatch):
    assert cli.main(["universal", "--torch", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "a")]) == 2  # an input error: one line, exit 2 (medjax.cli)
    import medjax.checkpoint

    def disk_error(*args, **kwargs):
        raise OSError("write failed")

    monkeypatch.setattr(medjax.checkpoint, "save_params", disk_error)
    with pytest.raises(OSError, match="write failed"):
        cli.main(["universal", "--torch", str(tmp_path / "u.pth"), "--out", str(tmp_path / "b")])
    assert sorted(os.listdir(tmp_path)) == [] and not _leftovers(tmp_path)
