"""Per-slide tile features in CLAM's `extract_features_fp.py` layout (Lu et al., Nat. Biomed. Eng. 2021), with UNI's
encoder and preprocessing (Chen et al., Nat. Med. 2024: `transforms.Resize(224)`, ImageNet mean / std).

    encoder = load_tile_encoder(config, "params/")             # converted UNI weights, a UNI run, or pytorch_model.bin
    extract_slides(encoder, jobs, "FEATS/", batch_size=32)      # FEATS/h5_files/<slide>.h5 [+ pt_files/<slide>.pt]

Each `<slide>.h5` holds `features` (N, D) float32 and `coords` (N, 2) int64 (level-0 top-left corners, in the
coordinates file's order, its attributes copied), and `<slide>.pt` - when torch is installed - the features as a
torch tensor, as CLAM writes them (`ABMIL` / CLAM's `Generic_MIL_Dataset` read either). Tiles are read as the
coordinates file says (`patch_size` pixels at `patch_level`), resized once to the encoder's input (PIL bilinear,
antialiased: what torchvision's `Resize` does to a PIL tile) and ImageNet-normalised; a Grain dataset over the
slide's tiles reads them on `threads` threads while the accelerator runs the previous batch. The batch is split over
every device of the mesh (`config.mesh`), the params replicated. Files are written atomically (`.partial`, then a
rename) and a slide whose h5 file exists is skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from medjax.data.readers.wsi import list_slides, slide_id
from medjax.data.tiling.coords import read_coords
from medjax.data.transforms.image import normalize_imagenet, resize
from medjax.errors import MedjaxInputError

H5_DIR, PT_DIR = "h5_files", "pt_files"


@dataclasses.dataclass(frozen=True)
class TileEncoder:
    """A jitted encoder: `apply(images (b, S, S, 3) float32, ImageNet-normalised) -> (b, D) float32`, with b a
    multiple of `batch_multiple` (the data-parallel devices); `image_size` S is its input side."""

    apply: Callable[[np.ndarray], Any]
    image_size: int
    batch_multiple: int = 1
    description: str = ""


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """One slide to extract: its file, its CLAM coordinates file."""

    slide_id: str
    slide_path: str
    coords_path: str


def _sharded_apply(forward: Callable, params: Any, mesh_config) -> tuple[Callable, int]:
    """forward(params, images) jitted with the batch split over the mesh's data axes, params replicated."""
    import jax

    from medjax.parallel.mesh import batch_sharding, data_parallel_size, make_mesh, replicated

    mesh = make_mesh(mesh_config)
    params = jax.device_put(params, replicated(mesh))
    jitted = jax.jit(forward, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))
    return (lambda images: jitted(params, images)), data_parallel_size(mesh)


def load_tile_encoder(config, params_path: str, *, image_size: int | None = None) -> TileEncoder:
    """The tile encoder of a UNI experiment `config` with the weights at `params_path`: a `save_params` directory of
    converted UNI weights ({"encoder": ...}: `python -m medjax.convert uni`), a UNI pretraining workdir or its
    params (the teacher backbone's CLS, as DINOv2 evaluates), or UNI's released `pytorch_model.bin` /
    `.safetensors` itself. `image_size`: the encoder's input side (default `uni_eval.image_size`)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from medjax import checkpoint as checkpoint_lib
    from medjax.models import dinov2 as dinov2_lib
    from medjax.models.uni import uni_fields_from_params, uni_model

    if config.get("task") != "uni_pretrain":
        raise MedjaxInputError(f"--exp {config.get('exp', '?')}: feature extraction needs a UNI experiment "
                               f"(task 'uni_pretrain'), this one's task is {config.get('task')!r}")
    dtype = jnp.dtype(config.get("dtype", "float32"))
    size = int(image_size or config.uni_eval.image_size)
    if os.path.isfile(params_path):  # UNI's released weights (timm keys)
        from medjax.convert import uni as convert_uni

        tree = {"encoder": convert_uni.load(params_path)[1]["params"]["encoder"]}
        what = f"UNI weights {params_path}"
    elif os.path.isdir(params_path):
        tree = checkpoint_lib.restore_params(checkpoint_lib.params_dir(params_path))
        tree = nn.unbox(tree.get("params", tree) if isinstance(tree, dict) else tree)
        what = f"params {params_path}"
    else:
        raise MedjaxInputError(f"--params {params_path}: no such file or directory (expected converted UNI weights, a "
                               "UNI training workdir or pytorch_model.bin)")
    if isinstance(tree, dict) and "encoder" in tree and "teacher" not in tree:
        model = uni_model(dtype=dtype, **uni_fields_from_params(tree))
        params = {"encoder": tree["encoder"]}

        def forward(p, images):
            return model.apply({"params": p}, images).astype(jnp.float32)
    elif isinstance(tree, dict) and "teacher" in tree:
        from medjax.tasks.uni_pretrain import network_from_config

        model = network_from_config(config)
        params = tree["teacher"]

        def forward(p, images):
            out = model.apply({"params": p}, images, method=dinov2_lib.DINOv2Network.features)
            return out["cls_token"].astype(jnp.float32)
        what += " (teacher backbone)"
    else:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise MedjaxInputError(f"--params {params_path}: expected converted UNI weights ({{'encoder': ...}}) or a UNI "
                               f"pretraining run's params ({{'student', 'teacher', ...}}), got {keys}")
    apply, multiple = _sharded_apply(forward, params, config.mesh)
    return TileEncoder(apply, size, multiple, what)


def find_jobs(slides_dir: str, coords_dir: str) -> list[SlideJob]:
    """One job per coordinates file `<coords_dir>/<slide_id>.h5` (or CLAM's `<coords_dir>/patches/`), its slide the
    file of that id in `slides_dir`; a coordinates file without its slide is an error naming both."""
    patches = os.path.join(coords_dir, "patches")
    directory = patches if os.path.isdir(patches) else coords_dir
    if not os.path.isdir(directory):
        raise MedjaxInputError(f"--coords {coords_dir}: no such directory (expected <slide_id>.h5 coordinate files, "
                               "from `python -m medjax.data tile` or CLAM's create_patches_fp.py)")
    names = sorted(name for name in os.listdir(directory) if name.endswith(".h5"))
    if not names:
        raise MedjaxInputError(f"--coords {directory}: no <slide_id>.h5 coordinate files")
    slides = {slide_id(path): path for path in list_slides(slides_dir)}
    jobs = []
    for name in names:
        sid = name[:-3]
        if sid not in slides:
            raise MedjaxInputError(f"{os.path.join(directory, name)}: no slide {sid!r} in --slides {slides_dir} "
                                   f"({len(slides)} slide files there)")
        jobs.append(SlideJob(sid, slides[sid], os.path.join(directory, name)))
    return jobs


def output_paths(out_dir: str, sid: str) -> tuple[str, str]:
    return os.path.join(out_dir, H5_DIR, f"{sid}.h5"), os.path.join(out_dir, PT_DIR, f"{sid}.pt")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def tile_batches(job: SlideJob, image_size: int, batch_size: int, *, threads: int = 4):
    """(coords (N, 2), attributes, an iterator of (images (b, S, S, 3) float32, rows) batches) of one slide's tiles:
    a Grain MapDataset over `WSITileSource` (tiles read at full size), mapped by UNI's transform, batched, read
    on `threads` threads; the last batch padded with its last tile to `batch_size` (one compiled shape)."""
    import grain

    from medjax.data.pipelines.wsi_tiles import WSITileSource

    try:
        coords, attrs = read_coords(job.coords_path)
    except ValueError as error:
        raise MedjaxInputError(str(error)) from error
    level, size = int(attrs["patch_level"]), int(attrs["patch_size"])
    source = WSITileSource([job.slide_path], np.zeros(len(coords), np.int32), coords, [level], [size],
                           tile_size=size, allow_edge_tiles=True,
                           describe_tile=lambda i: f"{job.coords_path}: row {i} of dataset 'coords'")

    def transform(example):
        return normalize_imagenet(resize(example["image"], image_size)).astype(np.float32)

    dataset = grain.MapDataset.source(source).map(transform).batch(batch_size, drop_remainder=False)
    batches = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(int(threads), 1), prefetch_buffer_size=4))

    def padded():
        for images in batches:
            rows = len(images)
            if rows < batch_size:
                images = np.concatenate([images, np.repeat(images[-1:], batch_size - rows, axis=0)])
            yield images, rows

    return coords, attrs, padded()


def slide_features(encoder: TileEncoder, job: SlideJob, batch_size: int, *, threads: int = 4,
                   on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features (N, D) float32, coords (N, 2) int64, coordinate attributes) of one slide; results are fetched
    two batches late so reading and encoding overlap."""
    batch_size = -(-int(batch_size) // encoder.batch_multiple) * encoder.batch_multiple
    coords, attrs, batches = tile_batches(job, encoder.image_size, batch_size, threads=threads)
    out, pending = [], []

    def fetch(keep: int):
        while len(pending) > keep:
            features, rows = pending.pop(0)
            out.append(np.asarray(features, np.float32)[:rows])
            if on_batch:
                on_batch(rows)

    for images, rows in batches:
        pending.append((encoder.apply(images), rows))
        fetch(2)
    fetch(0)
    features = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return features, coords, attrs


def write_features(out_dir: str, sid: str, features: np.ndarray, coords: np.ndarray, attrs: dict) -> list[str]:
    """`h5_files/<sid>.h5` (`features`, `coords` with the coordinates file's attributes) and, with torch,
    `pt_files/<sid>.pt`; each written to `.partial` and renamed, the h5 file last (it marks the slide done)."""
    import h5py

    h5_path, pt_path = output_paths(out_dir, sid)
    written = []
    torch = _torch()
    if torch is not None:
        os.makedirs(os.path.dirname(pt_path), exist_ok=True)
        with open(pt_path + ".partial", "wb") as handle:
            torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), handle)
        os.replace(pt_path + ".partial", pt_path)
        written.append(pt_path)
    os.makedirs(os.path.dirname(h5_path), exist_ok=True)
    with h5py.File(h5_path + ".partial", "w") as handle:
        handle.create_dataset("features", data=np.asarray(features, np.float32))
        dataset = handle.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for key, value in attrs.items():
            dataset.attrs[key] = value
    os.replace(h5_path + ".partial", h5_path)
    return [h5_path] + written


class _Progress:
    """Tiles done / total and tiles per second: one rewritten line on a TTY, a line per slide otherwise."""

    def __init__(self, total_slides: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_slides, self.tiles, self.start = total_slides, 0, time.monotonic()

    def rate(self) -> float:
        return self.tiles / max(time.monotonic() - self.start, 1e-9)

    def tile(self, rows: int, done: int, text: str) -> None:
        self.tiles += rows
        if self.tty:
            bar = "#" * int(30 * done / max(self.total_slides, 1))
            self.stream.write(f"\r[{bar:.<30}] slide {done + 1}/{self.total_slides} {text} "
                              f"{self.tiles} tiles {self.rate():.1f} tiles/s\033[K")
            self.stream.flush()

    def slide(self, done: int, text: str) -> None:
        end = "\n" if not self.tty or done == self.total_slides else ""
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}extract {done}/{self.total_slides} {text}\033[K{end}" if self.tty else
                          f"extract {done}/{self.total_slides} {text}{end}")
        self.stream.flush()


def extract_slides(encoder: TileEncoder, jobs: Sequence[SlideJob], out_dir: str, *, batch_size: int = 32,
                   threads: int = 4, stream=None) -> dict:
    """Features of every slide not done yet (module doc); {"done", "skipped", "tiles", "seconds", "tiles_per_s"}."""
    progress = _Progress(len(jobs), stream)
    done, skipped, tiles, seconds = [], [], 0, 0.0
    torch = _torch()
    for index, job in enumerate(jobs):
        h5_path, pt_path = output_paths(out_dir, job.slide_id)
        if os.path.isfile(h5_path) and (torch is None or os.path.isfile(pt_path)):
            skipped.append(job.slide_id)
            progress.slide(index + 1, f"{job.slide_id}: done before, skipped")
            continue
        start = time.monotonic()
        features, coords, attrs = slide_features(
            encoder, job, batch_size, threads=threads,
            on_batch=lambda rows, i=index, s=job.slide_id: progress.tile(rows, i, s))
        write_features(out_dir, job.slide_id, features, coords, attrs)
        elapsed = time.monotonic() - start
        tiles, seconds = tiles + len(coords), seconds + elapsed
        done.append(job.slide_id)
        progress.slide(index + 1, f"{job.slide_id}: {len(coords)} tiles, {features.shape[-1]}-d, "
                                  f"{len(coords) / max(elapsed, 1e-9):.1f} tiles/s")
    return {"done": done, "skipped": skipped, "tiles": tiles, "seconds": seconds,
            "tiles_per_s": tiles / seconds if seconds else 0.0}
