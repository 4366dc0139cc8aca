"""`python -m medjax.data make-demo --kind KIND --out DIR [--seed S]`: write demo data locally in
the real file formats (nothing is downloaded). Kinds come from `DEMO_MAKERS`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from medjax.data.demo_fundus_genome import make_fundus_genome_demo

# kind -> maker(out_dir, *, seed) -> out_dir. A new demo kind registers its maker here.
DEMO_MAKERS: dict[str, Callable[..., str]] = {
    "fundus_genome": make_fundus_genome_demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medjax.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("make-demo", help="write a small synthetic data set in the real file formats")
    demo.add_argument("--kind", required=True, choices=sorted(DEMO_MAKERS), help="which demo data set")
    demo.add_argument("--out", required=True, help="output directory (created if missing)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (the output is deterministic given it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-demo":
        out = DEMO_MAKERS[args.kind](args.out, seed=args.seed)
        print(f"{args.kind} demo data in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
