"""python -m data.captcha export --out DIR --n N [--seed S]"""
from __future__ import annotations

import argparse
import sys

from .io import export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.captcha", description="Synthetic slider-CAPTCHA tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="write N synthetic CAPTCHAs as PNGs plus labels.csv")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="sample i is generated from (seed, 0, i)")
    args = parser.parse_args(argv)
    try:
        labels = export(args.out, args.n, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} CAPTCHAs and {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
