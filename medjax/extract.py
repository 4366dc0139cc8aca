"""python -m medjax.extract --exp uni_vitl16 --params DIR --slides SLIDES --coords COORDS --out FEATS
    [--variant V] [--batch-size 32] [--threads 4] [--image-size 224] [--set k=v ...]

Slide feature extraction as CLAM's `extract_features_fp.py` does it (Lu et al., Nat. Biomed. Eng. 2021) with UNI's
encoder (Chen et al., Nat. Med. 2024): for every `COORDS/<slide_id>.h5` (CLAM's layout: `python -m medjax.data
tile`, or CLAM's own `create_patches_fp.py` output, `COORDS/patches/`), the tiles of `SLIDES/<slide_id>.<ext>` are
read, resized to 224 and ImageNet-normalised (UNI's transform), encoded and written to
`FEATS/h5_files/<slide_id>.h5` (`features` (N, D) float32, `coords` (N, 2)) and, when torch is installed,
`FEATS/pt_files/<slide_id>.pt`. A slide already done is skipped (rerun the same command to resume).

--params: converted UNI weights (`python -m medjax.convert uni --torch pytorch_model.bin --out DIR`), UNI's
`pytorch_model.bin` / `.safetensors` itself, or a `python -m medjax.train --exp uni_vitl16` workdir (its teacher).
The batch is split over all devices (`--set mesh.num_devices=N` for fewer); `--batch-size` is rounded up to a
multiple of the device count. Details: medjax.inference.slide_features.
"""
from __future__ import annotations

import argparse
import sys

from medjax.cli import entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment name (uni_vitl16)")
    p.add_argument("--params", required=True,
                   help="converted UNI weights (save_params dir), pytorch_model.bin, or a UNI training workdir")
    p.add_argument("--slides", required=True, help="directory of slides (.svs/.tif/.ndpi/...), named <slide_id>.<ext>")
    p.add_argument("--coords", required=True, help="directory of CLAM coordinate files <slide_id>.h5 (or its patches/)")
    p.add_argument("--out", required=True, help="output directory: h5_files/ and pt_files/ per slide")
    p.add_argument("--variant", default="full", help="config variant (must match the params; default full)")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass (default 32)")
    p.add_argument("--threads", type=int, default=4, help="tile reading threads (default 4)")
    p.add_argument("--image-size", type=int, default=None, help="encoder input side (default: uni_eval.image_size, 224)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from medjax import config as config_lib
    from medjax.errors import MedjaxInputError
    from medjax.inference import slide_features

    if args.batch_size < 1:
        raise MedjaxInputError(f"--batch-size {args.batch_size}: must be >= 1")
    config = config_lib.get_config(args.exp, args.variant, args.overrides)
    jobs = slide_features.find_jobs(args.slides, args.coords)
    encoder = slide_features.load_tile_encoder(config, args.params, image_size=args.image_size)
    print(f"extracting {len(jobs)} slides with {encoder.description} at {encoder.image_size} px, batch "
          f"{args.batch_size} over {encoder.batch_multiple} device(s) -> {args.out}", file=sys.stderr)
    summary = slide_features.extract_slides(encoder, jobs, args.out, batch_size=args.batch_size, threads=args.threads)
    print(f"extracted {len(summary['done'])} slides ({summary['tiles']} tiles, {summary['tiles_per_s']:.1f} tiles/s), "
          f"skipped {len(summary['skipped'])} done before -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
