"""`python -m medjax.data make-demo --kind KIND --out DIR [--seed S]`: write demo data locally in
the real file formats (nothing is downloaded).
`python -m medjax.data tile --slides DIR --out DIR [--patch-size 256 --magnification 20]`: tile
whole-slide images into `<out>/<slide_id>.h5` coordinates (CLAM's layout). Kinds come from `medjax.data.demo.DEMO_MAKERS`
(kind -> "module:function"), imported only when that kind is made."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from medjax.cli import entry_point
from medjax.data.demo import DEMO_MAKERS
from medjax.data.tiling.coords import add_tile_arguments, run_tile


def load_maker(kind: str) -> Callable[..., str]:
    """The registered maker `f(out_dir, *, seed) -> out_dir` of a demo kind."""
    module, function = DEMO_MAKERS[kind].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medjax.data",
                                     description="medjax data tools: write demo data locally in the real file formats.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("make-demo", help="write a small synthetic data set in the real file formats")
    demo.add_argument("--kind", required=True, choices=sorted(DEMO_MAKERS), help="which demo data set")
    demo.add_argument("--out", required=True, help="output directory (created if missing)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic given it)")
    add_tile_arguments(commands.add_parser(
        "tile", help="tile whole-slide images into <out>/<slide_id>.h5 coordinates (CLAM's layout)"))
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tile":
        return run_tile(args)
    if args.command == "make-demo":
        out = load_maker(args.kind)(args.out, seed=args.seed)
        print(f"{args.kind} demo data in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
