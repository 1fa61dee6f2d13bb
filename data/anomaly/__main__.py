"""python -m data.anomaly build --out DIR [--seed N] [--size PX] [--n_train N] [--n_test N] [--n_defect N]
[--categories a,b] [--overwrite]
python -m data.anomaly check --data_dir DIR [--train_meta F --test_meta F] [--categories a,b] [--val_fraction F]
[--seed N]"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from .layout import load_splits
from .synth import CATEGORIES, build_mini_mvtec


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, as for every other user mistake
        sys.stderr.write(f"data.anomaly: error: {message}\n")
        sys.exit(2)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    parser = _Parser(prog="python -m data.anomaly", description="Anomaly-detection data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="write a synthetic mini-MVTec (MVTec layout + UniAD meta files)")
    p.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--size", type=int, default=128, help="image side, px")
    p.add_argument("--n_train", type=int, default=48, help="train/good images per category")
    p.add_argument("--n_test", type=int, default=20, help="test/good images per category")
    p.add_argument("--n_defect", type=int, default=8, help="test images per defect type and category")
    p.add_argument("--categories", default=None, help=f"comma-separated subset of {','.join(CATEGORIES)} (default all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c = commands.add_parser("check", help="list and validate a dataset; print its counts per category")
    c.add_argument("--data_dir", required=True, help="MVTec-layout folder, or the image folder of the meta files")
    c.add_argument("--train_meta", default=None, help="UniAD JSON-lines training file (with --test_meta)")
    c.add_argument("--test_meta", default=None, help="UniAD JSON-lines test file (with --train_meta)")
    c.add_argument("--categories", default=None, help="comma-separated subset (default all)")
    c.add_argument("--val_fraction", type=float, default=0.1, help="normal training images held out per category")
    c.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            start = time.perf_counter()
            meta = build_mini_mvtec(args.out, args.seed, args.size, args.n_train, args.n_test, args.n_defect,
                                    _names(args.categories), args.overwrite)
            n = meta["images"]
            print(f"{args.out}: {len(meta['categories'])} categories of {args.size}x{args.size} px, {n['train']} train "
                  f"and {n['test']} test images ({n['test_defective']} defective) in "
                  f"{time.perf_counter() - start:.1f} s; UniAD meta files train.jsonl and test.jsonl")
            return 0
        splits = load_splits(args.data_dir, _names(args.categories), args.val_fraction, args.seed,
                             args.train_meta, args.test_meta)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    counts = {name: Counter() for name in ("train", "val", "test")}
    for name, records in zip(("train", "val", "test"), splits[:3]):
        counts[name].update(r.category for r in records)
    defective = Counter(r.category for r in splits.test if r.label)
    no_mask = Counter(r.category for r in splits.test if not r.has_mask)
    print(f"{'category':<16}{'train':>7}{'val':>6}{'test':>6}{'defective':>11}{'no mask':>9}")
    for cat in splits.categories:
        print(f"{cat:<16}{counts['train'][cat]:>7}{counts['val'][cat]:>6}{counts['test'][cat]:>6}"
              f"{defective[cat]:>11}{no_mask[cat]:>9}")
    print(f"{'all':<16}{len(splits.train):>7}{len(splits.val):>6}{len(splits.test):>6}{sum(defective.values()):>11}"
          f"{sum(no_mask.values()):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
