"""Issue #15 (reliability): the start-up check (`medjax.data.verify`, `data.verify=full|headers|none`) decodes
every image (a PNG whose pixel data are corrupt passes `PIL.verify()`), checks every CT header against its
voxel-data size, opens every slide's pyramid, in parallel, cached in the workdir by (path, size, mtime)."""
import csv
import os
import struct
import warnings
import zlib

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.config import ConfigError
from medjax.data import verify
from medjax.data.readers.ct import CTDataError
from medjax.data.pipelines.ct import read_ct_list
from medjax.data.errors import DataError, DataWarning
from medjax.data.readers.fundus_genome import FundusGenomeDataset
from medjax.data.readers.wsi import SlideError
from medjax.tasks.base import RunSettings, TaskBase


def _png(path, value=90):
    Image.fromarray(np.random.default_rng(value).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _corrupt_pixels(path):
    """Zero the second half of the PNG's IDAT and fix its CRC: PIL's verify() passes, decoding fails."""
    data = open(path, "rb").read()
    i = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[i - 4:i])
    idat = bytearray(data[i + 4:i + 4 + n])
    idat[n // 2:] = bytes(n - n // 2)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(idat)) & 0xFFFFFFFF)
    open(path, "wb").write(data[:i + 4] + bytes(idat) + crc + data[i + 8 + n:])


def _fundus(root, n=4, bad=()):
    os.makedirs(root / "img", exist_ok=True)
    rows = []
    for i in range(n):
        _png(root / "img" / f"{i}.png", i)
        if i in bad:
            _corrupt_pixels(root / "img" / f"{i}.png")
        rows.append([f"p{i}", "left", f"img/{i}.png"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["participant_id", "eye", "image_path"]] + rows)
    return FundusGenomeDataset(str(root), image_size=8, genotypes=None, check_images=False)


def test_corrupt_pixel_data_passes_pil_verify_but_not_the_full_check(tmp_path):
    ds = _fundus(tmp_path, bad=(2,))
    with Image.open(ds.image_paths[2]) as im:
        im.verify()  # what the old start-up check did: it passes
    checks = verify.image_checks(ds.image_paths, ds.image_wheres)
    assert verify.verify_files(checks, mode="headers", log=lambda _: None) == []
    with pytest.raises(DataError, match=r"manifest\.csv: line 4: field 'image_path': .*img/2\.png is not a readable "
                                        r"image \(OSError: broken data stream.*fix or remove the file"):
        verify.verify_files(checks, mode="full", log=lambda _: None)
    assert verify.verify_files(checks, mode="none") == []


def test_every_failure_is_counted_and_skip_mode_warns(tmp_path):
    ds = _fundus(tmp_path, n=5, bad=(1, 3))
    os.remove(ds.image_paths[4])
    checks = verify.image_checks(ds.image_paths, ds.image_wheres)
    with pytest.raises(DataError, match=r"line 3: .*1\.png is not a readable image .*\(2 more bad file\(s\), e\.g\. "
                                        r".*line 5: .*3\.png .*; .*line 6: .*4\.png: image file .*not found"):
        verify.verify_files(checks, log=lambda _: None, threads=3)
    with pytest.warns(DataWarning, match=r"line 3: .*2 more bad file.*on_bad_example=skip"):
        messages = verify.verify_files(checks, log=lambda _: None, skip_bad=True)
    assert len(messages) == 3 and "1.png" in messages[0] and "4.png" in messages[2]


def test_results_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    ds = _fundus(tmp_path / "data", n=3)
    checks = verify.image_checks(ds.image_paths, ds.image_wheres)
    calls = []
    real = verify.CHECKERS["image"]
    monkeypatch.setitem(verify.CHECKERS, "image", lambda c, m: (calls.append((c.paths[0], m)), real(c, m)))
    lines = []
    workdir = str(tmp_path / "run")
    verify.verify_files(checks, mode="headers", cache_dir=workdir, log=lines.append)
    assert len(calls) == 3 and os.path.isfile(os.path.join(workdir, verify.CACHE_FILE))
    verify.verify_files(checks, mode="headers", cache_dir=workdir, log=lines.append)
    assert len(calls) == 3 and "all 3 files passed before" in lines[-1]
    verify.verify_files(checks, mode="full", cache_dir=workdir, log=lines.append)  # headers does not cover full
    assert len(calls) == 6 and [m for _, m in calls[3:]] == ["full"] * 3
    verify.verify_files(checks, mode="headers", cache_dir=workdir, log=lines.append)  # full covers headers
    assert len(calls) == 6
    _png(ds.image_paths[1], 7)  # rewritten: new size / mtime
    os.utime(ds.image_paths[1], ns=(1, 1))
    verify.verify_files(checks, mode="full", cache_dir=workdir, log=lines.append)
    assert calls[6:] == [(ds.image_paths[1], "full")] and "1 of 1 files passed" in lines[-1]
    assert "2 cached" in lines[-1]


def _nifti(path, shape=(4, 4, 3)):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))


def test_ct_headers_and_voxel_data_size(tmp_path):
    os.makedirs(tmp_path / "01_Multi")
    for name in ("img1", "lab1", "img2", "lab2", "img3", "lab3"):
        _nifti(tmp_path / "01_Multi" / f"{name}.nii", (4, 4, 2) if name == "lab3" else (4, 4, 3))
    data = open(tmp_path / "01_Multi" / "img2.nii", "rb").read()
    open(tmp_path / "01_Multi" / "img2.nii", "wb").write(data[:-10])  # truncated voxel data
    lines = [f"01_Multi/img{i}.nii\t01_Multi/lab{i}.nii" for i in (1, 2, 3)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cases = read_ct_list(str(tmp_path / "train.txt"), str(tmp_path), check_headers=False)
    with pytest.raises(CTDataError, match=r"train\.txt: line 2: image .*img2\.nii: truncated: the header describes "
                                          r"voxel data ending at byte 448, the file has 438 .*1 more bad file.*"
                                          r"line 3: label .*lab3\.nii shape \(4, 4, 2\) does not match"):
        verify.verify_files(verify.ct_checks(cases), mode="headers", log=lambda _: None)


def test_slide_pyramid(tmp_path):
    import tifffile

    from medjax.data.readers.wsi_write import write_pyramidal_tiff

    good = str(tmp_path / "a.tif")
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    write_pyramidal_tiff(good, pixels, mpp=0.5, tile=16, downsamples=(1, 4))
    data = open(good, "rb").read()
    truncated = str(tmp_path / "b.tif")
    open(truncated, "wb").write(data[: len(data) * 3 // 4])
    corrupt = str(tmp_path / "c.tif")
    with tifffile.TiffFile(good) as tif:  # the last tile of level 0: zlib data zeroed
        page = tif.series[0].levels[0].pages[0]
        start, count = page.dataoffsets[-1], page.databytecounts[-1]
    open(corrupt, "wb").write(data[:start] + bytes(count) + data[start + count:])
    checks = verify.slide_checks([good, good, truncated], "coords/ (tile coordinates)")
    assert len(checks) == 2  # one check per slide
    with pytest.raises(SlideError, match=r"coords/ \(tile coordinates\): .*b\.tif: (truncated file|not a readable)"):
        verify.verify_files(checks, mode="headers", log=lambda _: None)
    checks = verify.slide_checks([good, corrupt], "coords/")
    assert verify.verify_files(checks, mode="headers", log=lambda _: None) == []
    with pytest.raises(SlideError, match=r"coords/: .*c\.tif: cannot decode segment 15 of level 0"):
        verify.verify_files(checks, mode="full", log=lambda _: None)


class _CheckingTask(TaskBase):
    """A task that only runs the start-up check (TaskBase.verify_data)."""


def _task(tmp_path, **data):
    config = ml_collections.ConfigDict(dict(train=dict(batch_size=2, eval_batch_size=2, steps=1),
                                            data=dict(dict(verify="full", on_bad_example="error"), **data)))
    run = RunSettings.from_config(config, workdir=str(tmp_path / "run"))
    return _CheckingTask(config, log=lambda _: None, run=run)


def test_task_verify_data_uses_the_config_and_caches_in_the_workdir(tmp_path):
    ds = _fundus(tmp_path / "data", n=3, bad=(0,))
    checks = verify.image_checks(ds.image_paths, ds.image_wheres)
    with pytest.raises(DataError, match=r"line 2: .*0\.png is not a readable image"):
        _task(tmp_path).verify_data(checks)
    _task(tmp_path, **{"verify": "headers"}).verify_data(checks)
    assert os.path.isfile(tmp_path / "run" / verify.CACHE_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _task(tmp_path, **{"on_bad_example": "skip"}).verify_data(checks)
    assert any(issubclass(w.category, DataWarning) for w in caught)
    with pytest.raises(ConfigError, match=r"config data.verify='fast': expected one of full, headers, none"):
        _task(tmp_path, **{"verify": "fast"}).verify_data(checks)
    with pytest.raises(ConfigError, match=r"config data.on_bad_example='ignore': expected one of error, skip"):
        _task(tmp_path, **{"on_bad_example": "ignore"}).on_bad_example


def test_progress_bar_on_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = verify._Progress(4, stream)
    for _ in range(4):
        progress.step()
    assert stream.getvalue().endswith("\rverifying data [" + "#" * 30 + "] 4/4\n")
    plain = io.StringIO()
    verify._Progress(4, plain).step()
    assert plain.getvalue() == ""  # not a terminal: only the summary line (log)
