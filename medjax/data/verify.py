"""The start-up check of a run's data files (issue #15): every file read before step 0, in parallel, with
a progress bar, cached in the workdir, so a bad file stops the run at once, named, instead of at step N.

Config key `data.verify` (`medjax.tasks.base.TaskBase.verify_data` passes it):
- "full" (default): decode every image (all its pixels: `PIL.Image.verify()` checks only the PNG chunk
  checksums and misses corrupt or truncated pixel data); read every CT header and check that the voxel
  data are as long as the header says (uncompressed .nii: the file size; .nii.gz: the gzip trailer's
  length, mod 2^32) and that each label matches its image's shape and affine; open every slide's pyramid
  and decode the first and last segment of each level; decode every image of an Arrow file.
- "headers": the same, but images and slides are only opened (format, size, PNG checksums), not decoded.
- "none": no start-up check (the readers still fail naming the file when they meet a bad one).

Each check is one `FileCheck` (a kind, its file paths, and `where`: the manifest line that names them).
A passed check is cached in `<workdir>/data_verified.json` by (kind, absolute paths, sizes, mtimes) and
the mode it passed in ("full" covers "headers"), so a rerun does not repeat it; a changed file is checked
again. Failures are collected over all files: the error names the first (with its manifest line) and
counts the rest. With `data.on_bad_example=skip` the failures are a `DataWarning` instead (the pipeline
then skips those files deterministically, `medjax.data.pipelines.global_batches`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import json
import os
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from medjax.data.errors import DataError, DataWarning
from medjax.errors import MedjaxInputError

MODES = ("full", "headers", "none")
CACHE_FILE = "data_verified.json"
CACHE_VERSION = 1
_COVERS = {"full": ("full",), "headers": ("full", "headers")}  # a cached mode -> the requests it satisfies


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """One start-up check: `kind` (a key of CHECKERS), the file(s) it reads, and the manifest line naming them."""
    kind: str
    paths: tuple[str, ...]
    where: str


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"verify mode {mode!r}: expected one of {', '.join(MODES)} (config data.verify)")
    return mode


# ---- per-format checks: (check, mode) -> None, or a MedjaxInputError naming the file --------------------

def check_image(check: FileCheck, mode: str) -> None:
    """full: `medjax.data.read_image` (every pixel decoded); headers: PIL open + verify (format, size, PNG CRCs)."""
    from PIL import Image

    from medjax.data.readers.image_io import decode

    (path,) = check.paths
    name = f"{check.where}: {path}"
    if mode == "full":
        decode(path, name)
        return
    if not os.path.isfile(path):
        raise DataError(f"{name}: image file not found")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise DataError(f"{name} is not a readable image ({type(e).__name__}: {e})") from e


def nifti_data_size(path: str) -> tuple[int, int | None]:
    """(bytes the header says the voxel data end at, bytes the file holds uncompressed or None if unknown):
    .nii: the file size; .nii.gz: the gzip trailer's ISIZE (uncompressed length mod 2^32) of a one-member file."""
    import nibabel as nib

    image = nib.load(path)
    header = image.header  # (its vox_offset reads 0 once loaded: the array proxy keeps the file's offset)
    offset = int(getattr(image.dataobj, "offset", 0))
    expected = offset + int(np.prod(header.get_data_shape())) * np.dtype(header.get_data_dtype()).itemsize
    if not path.endswith(".gz"):
        return expected, os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", f.read(4))
    return expected, (isize if expected < 2 ** 32 else None)


def _nifti_header_and_size(path: str, field: str, where: str):
    """(shape, affine) of a NIfTI file whose voxel data is as long as its header says (CTDataError otherwise)."""
    from medjax.data.readers.ct import CTDataError, read_nifti_header

    header = read_nifti_header(path)
    try:
        expected, actual = nifti_data_size(path)
    except (OSError, gzip.BadGzipFile, struct.error) as e:
        raise CTDataError(f"{where}: {field} {path}: cannot read its size ({type(e).__name__}: {e})") from e
    if actual is not None and actual < expected:
        raise CTDataError(f"{where}: {field} {path}: truncated: the header describes voxel data ending at "
                          f"byte {expected}, the {'uncompressed ' if path.endswith('.gz') else ''}file has {actual}")
    return header


def check_ct_volume(check: FileCheck, mode: str) -> None:
    """One CT NIfTI (no label): a readable header and voxel data as long as it says."""
    _nifti_header_and_size(check.paths[0], "volume", check.where)


def check_ct_pair(check: FileCheck, mode: str) -> None:
    """A CT image and its label: readable NIfTI headers, voxel data as long as each header says, the
    label's shape and affine equal to the image's (either mode: the voxels are read when the run caches them)."""
    from medjax.data.readers.ct import LABEL_AFFINE_TOL, CTDataError

    (image_shape, image_affine), (label_shape, label_affine) = [
        _nifti_header_and_size(path, field, check.where) for field, path in zip(("image", "label"), check.paths)]
    if label_shape != image_shape:
        raise CTDataError(f"{check.where}: label {check.paths[1]} shape {label_shape} does not match image "
                          f"{check.paths[0]} shape {image_shape}")
    if not np.allclose(label_affine, image_affine, atol=LABEL_AFFINE_TOL, rtol=0):
        raise CTDataError(f"{check.where}: label {check.paths[1]} affine does not match image {check.paths[0]} affine")


def check_slide(check: FileCheck, mode: str) -> None:
    """The slide's pyramid (every level's size and segment table); full: also the first and last segment of
    every level decoded."""
    from medjax.data.readers.wsi import SlideError, open_slide

    (path,) = check.paths
    try:
        with open_slide(path) as slide:
            dims = slide.level_dimensions
            if not dims:
                raise SlideError(f"{path}: no pyramid levels")
            if mode == "full":
                w0, h0 = dims[0]
                for level, (w, h) in enumerate(dims):
                    slide.read_region((0, 0), level, (1, 1))
                    slide.read_region(((w - 1) * w0 // w, (h - 1) * h0 // h), level, (2, 2))
    except SlideError as e:
        raise SlideError(f"{check.where}: {e}") from e


def check_arrow_images(check: FileCheck, mode: str) -> None:
    """Every record of an Arrow image-report file (already parsed when the dataset was built); full: every
    image cell decoded."""
    from medjax.data.readers.arrow_ipc import read_arrow
    from medjax.data.readers.image_io import decode

    (path,) = check.paths
    table = read_arrow(path)
    if mode != "full":
        return
    images = table["image"]
    for i in range(table.num_rows):
        decode(images[i], f"{path}: row {i}: field 'image'")


CHECKERS: dict[str, Callable[[FileCheck, str], None]] = {
    "image": check_image, "ct_pair": check_ct_pair, "ct_volume": check_ct_volume, "slide": check_slide, "arrow_images": check_arrow_images,
}


# ---- the check lists of the datasets ---------------------------------------------------------------------

def image_checks(paths: Sequence[str], wheres: Sequence[str]) -> list[FileCheck]:
    return [FileCheck("image", (p,), w) for p, w in zip(paths, wheres)]


def image_report_checks(dataset) -> list[FileCheck]:
    """`medjax.data.readers.image_report.ImageReportDataset`: each JSONL row's image, each Arrow file's images."""
    checks = []
    for rows in dataset.files:
        if rows.arrow is not None:
            checks.append(FileCheck("arrow_images", (rows.path,), rows.path))
        else:
            checks += [FileCheck("image", (image,), f"{rows.where(k)}: field 'image'") for k, image in enumerate(rows.images)]
    return checks


def ct_checks(cases) -> list[FileCheck]:
    """`medjax.data.pipelines.ct.CTCase`s: each image/label pair."""
    return [FileCheck("ct_pair", (case.image, case.label), case.where) for case in cases]


def volume_report_checks(dataset) -> list[FileCheck]:
    """`medjax.data.readers.volume_report.VolumeReportDataset`: each row's CT volume."""
    return [FileCheck("ct_volume", (path,), f"{dataset.path}: line {line}: field 'volume'")
            for path, line in zip(dataset.volumes, dataset.lines)]


def slide_checks(slide_paths: Sequence[str], where: str) -> list[FileCheck]:
    return [FileCheck("slide", (path,), where) for path in dict.fromkeys(slide_paths)]


# ---- running them ----------------------------------------------------------------------------------------

def _stat_key(check: FileCheck) -> str | None:
    """The cache key of a check: kind, absolute paths, sizes and mtimes; None when a file is missing."""
    try:
        stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in check.paths]
    except OSError:
        return None
    return json.dumps([check.kind, stats])


class VerifyCache:
    """`<directory>/data_verified.json`: check key -> the mode it passed in. No directory: nothing is cached."""

    def __init__(self, directory: str | None):
        self.path = os.path.join(directory, CACHE_FILE) if directory else None
        self.entries: dict[str, str] = {}
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    content = json.load(f)
                if content.get("version") == CACHE_VERSION:
                    self.entries = dict(content.get("entries", {}))
            except (OSError, ValueError, AttributeError):  # a damaged cache is rebuilt, not trusted
                self.entries = {}

    def passed(self, key: str | None, mode: str) -> bool:
        return key is not None and self.entries.get(key) in _COVERS[mode]

    def save(self) -> None:
        if not self.path:
            return
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".data_verified-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": self.entries}, f)
        os.replace(tmp, self.path)


class _Progress:
    """`verifying data: done/total` on one rewritten stderr line (a TTY only; elsewhere the summary line)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lock, self.last = threading.Lock(), 0.0

    def step(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.enabled and (now - self.last > 0.2 or self.done == self.total):
                self.last = now
                width = 30
                filled = width * self.done // max(self.total, 1)
                self.stream.write(f"\rverifying data [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
                if self.done == self.total:
                    self.stream.write("\n")
                self.stream.flush()


def verify_files(checks: Sequence[FileCheck], *, mode: str = "full", cache_dir: str | None = None,
                 threads: int | None = None, log: Callable[[str], None] = print, skip_bad: bool = False) -> list[str]:
    """Run every check not already passed in `cache_dir`'s cache (module docstring); returns the messages of
    the failed checks (only with `skip_bad`: else the first failure is raised as a DataError-type error,
    naming the file and counting the others)."""
    check_mode(mode)
    if mode == "none" or not checks:
        return []
    for check in checks:
        if check.kind not in CHECKERS:
            raise ValueError(f"verify_files: unknown check kind {check.kind!r}; known: {sorted(CHECKERS)}")
    cache = VerifyCache(cache_dir)
    keys = [_stat_key(c) for c in checks]
    todo = [(c, k) for c, k in zip(checks, keys) if not cache.passed(k, mode)]
    cached = len(checks) - len(todo)
    if not todo:
        log(f"data check: all {len(checks)} files passed before (data.verify={mode}, cached in {cache.path})")
        return []
    workers = threads or min(16, 2 * (os.cpu_count() or 1))
    start = time.perf_counter()
    progress = _Progress(len(todo))
    failures: list[tuple[int, Exception]] = []

    def run(index: int) -> None:
        check, key = todo[index]
        try:
            CHECKERS[check.kind](check, mode)
        except Exception as error:  # noqa: BLE001 - collected, the first re-raised below
            failures.append((index, error))
        else:
            if key is not None:
                cache.entries[key] = mode
        finally:
            progress.step()

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(len(todo))))
    cache.save()
    failures.sort(key=lambda item: item[0])  # the first bad file in manifest order
    seconds = time.perf_counter() - start
    log(f"data check (data.verify={mode}): {len(todo) - len(failures)} of {len(todo)} files passed in {seconds:.1f}s"
        + (f", {cached} cached" if cached else "") + (f", {len(failures)} failed" if failures else ""))
    if not failures:
        return []
    messages = [str(error) for _, error in failures]
    more = f" ({len(failures) - 1} more bad file(s), e.g. {'; '.join(messages[1:3])})" if len(failures) > 1 else ""
    if skip_bad:
        warnings.warn(f"{messages[0]}{more}; data.on_bad_example=skip: these examples will be skipped",
                      DataWarning, stacklevel=2)
        return messages
    index, first = failures[0]
    advice = "; fix or remove the file(s), or set data.on_bad_example=skip to train without them"
    if isinstance(first, MedjaxInputError):  # already names the file: keep its type (CTDataError, SlideError, ...)
        raise type(first)(f"{first}{more}{advice}") from first
    raise DataError(f"{todo[index][0].where}: {', '.join(todo[index][0].paths)}: {type(first).__name__}: "
                    f"{first}{more}{advice}") from first
