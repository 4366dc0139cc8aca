"""The embedded demo datasets: made once, locally, in the real file formats, in a cache dir."""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import tempfile
from typing import Callable

COMPLETE_MARKER = ".complete"  # written last by each maker, holding the maker's arguments as JSON

# kind -> "module:function(out_dir) -> path"; each makes its demo through `build_demo` (temporary directory,
# file lock, rename into place), so concurrent first uses are safe.
DEMO_MAKERS = {
    "fundus_genome": "medjax.data.demo.fundus_genome:make_fundus_genome_demo",
    "fundus_transfer": "medjax.data.demo.fundus_transfer:make_fundus_transfer_demo",
    "ct": "medjax.data.demo.ct:make_ct_demo",
    "wsi": "medjax.data.demo.wsi:make_wsi_demo",
    "image_report": "medjax.data.demo.image_report:make_image_report_demo",
    "xray_ct_reports": "medjax.data.demo.xray_ct_reports:make_xray_ct_reports_demo",
    "pathology_chat": "medjax.data.demo.pathology_chat:make_pathology_chat_demo",
    "ct_reports": "medjax.data.demo.ct_reports:make_ct_reports_demo",
}


def demo_is_current(out_dir: str, params: dict, required: tuple[str, ...] = ()) -> bool:
    """True when `out_dir` holds a finished demo made with `params` (and the `required` files). Read-only:
    a demo of other arguments is replaced whole by `build_demo`."""
    marker = os.path.join(out_dir, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        same = f.read().strip() == json.dumps(params, sort_keys=True)
    return same and all(os.path.isfile(os.path.join(out_dir, name)) for name in required)


def mark_demo_complete(out_dir: str, params: dict) -> None:
    with open(os.path.join(out_dir, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        f.write(json.dumps(params, sort_keys=True))


@contextlib.contextmanager
def _exclusive_lock(path: str, log=print):
    """An advisory `flock` on `path` (created), held for the block; says so when another process holds it."""
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process making the demo data ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo(out_dir: str, params: dict, write: Callable[[str], None], required: tuple[str, ...] = (),
               log=print) -> str:
    """Make a demo at `out_dir` atomically: unless it is already current (`demo_is_current`), take the lock
    `<out_dir>.lock`, check again (another process may just have made it), let `write(tmp)` fill a fresh
    temporary directory beside `out_dir`, mark it complete and rename it into place, replacing a demo of other
    arguments. A reader therefore sees either no demo or a whole one, and two processes on a fresh cache make
    it once. A non-empty `out_dir` that is no medjax demo (no `.complete` marker) is refused, not replaced."""
    if demo_is_current(out_dir, params, required):
        return out_dir
    target = os.path.abspath(out_dir)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    with _exclusive_lock(target + ".lock", log=log):
        if demo_is_current(out_dir, params, required):
            return out_dir
        if os.path.isdir(target) and os.listdir(target) and not os.path.isfile(os.path.join(target, COMPLETE_MARKER)):
            from medjax.errors import MedjaxInputError

            raise MedjaxInputError(f"{out_dir}: exists and is not a finished medjax demo (no {COMPLETE_MARKER} "
                                   f"marker); remove it or choose another output directory")
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            write(tmp)
            mark_demo_complete(tmp, params)
            if os.path.exists(target):  # a demo of other arguments (or an empty directory): moved away whole
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rename(target, os.path.join(old, name))
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def cache_dir() -> str:
    """$MEDJAX_CACHE, else $XDG_CACHE_HOME/medjax, else ~/.cache/medjax."""
    if os.environ.get("MEDJAX_CACHE"):
        return os.environ["MEDJAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medjax")


def ensure_demo(kind: str, log=print) -> str:
    """The demo dataset of `kind`, made on first use; prints where it lives."""
    if kind not in DEMO_MAKERS:
        raise ValueError(f"no demo dataset of kind {kind!r}; kinds: {sorted(DEMO_MAKERS)}")
    out = os.path.join(cache_dir(), "demo", kind)
    if not os.path.exists(os.path.join(out, COMPLETE_MARKER)):
        log(f"making the {kind} demo dataset in {out} (once; pass --data DIR to train on your own data)")
    module, function = DEMO_MAKERS[kind].split(":")
    getattr(importlib.import_module(module), function)(out)
    log(f"demo data: {out}")
    return out
