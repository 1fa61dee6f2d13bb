"""python -m data.captcha export --out DIR --n N [--seed S] [--render default|train|heldout] [--backgrounds DIR]
                                [--backgrounds_prob P]"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .io import export, load_backgrounds
from .render import RENDERS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.captcha", description="Synthetic slider-CAPTCHA tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="write N synthetic CAPTCHAs as PNGs plus labels.csv")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="sample i is generated from (seed, 0, i)")
    p.add_argument("--render", choices=sorted(RENDERS), default="default",
                   help="rendering mix: default (the original generator, the validation set), train (the "
                        "realistic training mix) or heldout (settings the training mix never uses)")
    p.add_argument("--backgrounds", default=None, help="folder of your own images added to the background pool")
    p.add_argument("--backgrounds_prob", type=float, default=0.5,
                   help="share of samples drawn on a --backgrounds image")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.backgrounds_prob <= 1:
            raise ValueError(f"--backgrounds_prob must be in [0, 1], got {args.backgrounds_prob}")
        # read before anything is written: a bad folder leaves --out untouched
        backgrounds = load_backgrounds(args.backgrounds) if args.backgrounds else ()
        render = dataclasses.replace(RENDERS[args.render], user_prob=args.backgrounds_prob)
        labels = export(args.out, args.n, args.seed, render, backgrounds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} CAPTCHAs and {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
