"""The embedded demo datasets: made once, locally, in the real file formats, in a cache dir."""
from __future__ import annotations

import importlib
import json
import os

COMPLETE_MARKER = ".complete"  # written last by each maker, holding the maker's arguments as JSON

# kind -> "module:function(out_dir) -> path"; each writes a `.complete` marker when done.
DEMO_MAKERS = {
    "fundus_genome": "medjax.data.demo.fundus_genome:make_fundus_genome_demo",
    "ct": "medjax.data.demo.ct:make_ct_demo",
    "wsi": "medjax.data.demo.wsi:make_wsi_demo",
    "image_report": "medjax.data.demo.image_report:make_image_report_demo",
    "xray_ct_reports": "medjax.data.demo.xray_ct_reports:make_xray_ct_reports_demo",
    "ct_reports": "medjax.data.demo.ct_reports:make_ct_reports_demo",
}


def demo_is_current(out_dir: str, params: dict, required: tuple[str, ...] = ()) -> bool:
    """True when `out_dir` holds a finished demo made with `params` (and the `required` files); a marker
    left by other arguments is removed, so an interrupted or different demo is made again."""
    marker = os.path.join(out_dir, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        same = f.read().strip() == json.dumps(params, sort_keys=True)
    if same and all(os.path.isfile(os.path.join(out_dir, name)) for name in required):
        return True
    os.remove(marker)
    return False


def mark_demo_complete(out_dir: str, params: dict) -> None:
    with open(os.path.join(out_dir, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        f.write(json.dumps(params, sort_keys=True))


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
    if not os.path.exists(os.path.join(out, ".complete")):
        log(f"making the {kind} demo dataset in {out} (once; pass --data DIR to train on your own data)")
    module, function = DEMO_MAKERS[kind].split(":")
    getattr(importlib.import_module(module), function)(out)
    log(f"demo data: {out}")
    return out
