"""The labelled data of UNI's evaluation (`medjax.tasks.uni_eval`, module doc): `tile_labels.csv` /
`slides.csv` rows, their `split` column or a seeded stratified holdout, the slides by id, and the ABMIL bags
(every tissue tile of a slide: CLAM's `coords/<slide_id>.h5`, else tiled now)."""
from __future__ import annotations

import csv
import os

import numpy as np

from medjax.data.pipelines.wsi_tiles import WSITileSource
from medjax.data.readers.text_io import open_text
from medjax.data.readers.wsi import SLIDE_EXTENSIONS
from medjax.data.tiling.coords import read_coords, tile_slide
from medjax.data.tiling.tissue import PRESETS
from medjax.errors import MedjaxInputError


def read_csv_rows(path: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of a CSV with a header holding the `required` columns (an error naming the missing ones)."""
    with open_text(path, f"CSV ({','.join(required)})") as handle:
        reader = csv.DictReader(handle)
        missing = set(required) - set(reader.fieldnames or ())
        if missing:
            raise MedjaxInputError(f"{path}: missing column(s) {sorted(missing)}; expected {','.join(required)}")
        return list(reader)


def split_flags(rows: list[dict], path: str) -> np.ndarray | None:
    """True for test rows from a `split` column (train / val / test), None without one."""
    if not rows or "split" not in rows[0]:
        return None
    values = [row["split"].strip().lower() for row in rows]
    bad = sorted(set(values) - {"train", "val", "test"})
    if bad:
        raise MedjaxInputError(f"{path}: column 'split' must hold train, val or test, got {bad}")
    return np.array([v == "test" for v in values])


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for held-out rows: per class, a seeded shuffle and the first floor(fraction * count) rows."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test[rows[:int(fraction * len(rows))]] = True
    return test


def slides_dir(root: str) -> str:
    """Where the slides are: `<root>/slides` when it exists, else `root`."""
    return os.path.join(root, "slides") if os.path.isdir(os.path.join(root, "slides")) else root


def _slide_path(root: str, row: dict, path: str) -> str:
    if row.get("file"):
        candidate = os.path.join(root, row["file"])
        if os.path.isfile(candidate):
            return candidate
        raise MedjaxInputError(f"{path}: slide file {row['file']!r} of {row['slide_id']} not found under {root}")
    for ext in SLIDE_EXTENSIONS:
        candidate = os.path.join(slides_dir(root), row["slide_id"] + ext)
        if os.path.isfile(candidate):
            return candidate
    raise MedjaxInputError(f"{path}: no slide {row['slide_id']!r} in {slides_dir(root)} (extensions {SLIDE_EXTENSIONS})")


def slide_bag_source(root: str, slide_rows: list[dict], slides_csv: str, settings, work_dir: str) -> WSITileSource:
    """Every tissue tile of each slide (coords from `<root>/coords`, else tiled into `work_dir`)."""
    paths, index, coords, levels, sizes = [], [], [], [], []
    rng = np.random.default_rng(settings.abmil.seed)
    for s, row in enumerate(slide_rows):
        path = _slide_path(root, row, slides_csv)
        h5 = os.path.join(root, "coords", f"{row['slide_id']}.h5")
        if not os.path.isfile(h5):
            result = tile_slide(path, work_dir, patch_size=settings.patch_size, magnification=settings.magnification,
                                params=PRESETS[settings.tiling_preset or ("demo" if settings.is_demo else "default")])
            if result.status != "ok":
                raise MedjaxInputError(f"{path}: no tissue tiles for the ABMIL bag ({result.message})")
            h5 = result.h5_path
        xy, attrs = read_coords(h5)
        if settings.abmil.max_tiles and len(xy) > settings.abmil.max_tiles:
            xy = xy[np.sort(rng.choice(len(xy), settings.abmil.max_tiles, replace=False))]
        paths.append(path)
        index.append(np.full(len(xy), s, np.int32))
        coords.append(xy)
        levels.append(int(attrs["patch_level"]))
        sizes.append(int(attrs["patch_size"]))
    return WSITileSource(paths, np.concatenate(index), np.concatenate(coords), levels, sizes,
                         tile_size=settings.patch_size, allow_edge_tiles=True)
