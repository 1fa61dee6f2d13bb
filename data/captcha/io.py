"""Files on disk: reading an image, the labelled-folder format (DIR/labels.csv plus images), the exporter
that writes synthetic samples in that format (python -m data.captcha export) and the user's folder of
background images (--backgrounds).

labels.csv holds one row per image (an image listed twice is an error), header LABEL_COLUMNS, coordinates
as float pixels of the original image (not the canvas), centres at +0.5 as everywhere in data/captcha.
Images smaller than MIN_IMAGE_SIDE px on a side are refused by load_image.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np

from .render import RenderConfig, generate_captcha

LABEL_COLUMNS = ("filename", "gap_x", "gap_y", "slider_x", "slider_y")
# px; the smallest piece generate_captcha draws is about 26 px across: a smaller image cannot hold a gap
# and a slider (letterboxing would only blow it up)
MIN_IMAGE_SIDE = 24
BACKGROUND_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_USER_MAX_SIDE = 1024  # px, long side of a user background: as the skimage photos, crops of it still have detail


def load_image(path) -> np.ndarray:
    """(h, w, 3) uint8 RGB; ValueError naming the file if it is missing, not a decodable image, or smaller
    than MIN_IMAGE_SIDE px on a side."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # with imdecode: works for non-ASCII paths too
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e.strerror or e})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"{path}: not a decodable image (expected PNG, JPEG, BMP, WebP, ...)")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"{path}: {w}x{h} px is too small for a CAPTCHA (expected at least {MIN_IMAGE_SIDE} px "
                         "on each side: a gap and a slider piece must fit)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _read_labels(csv_path: Path) -> list[tuple[str, float, float, float, float]]:
    expected = ",".join(LABEL_COLUMNS)
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: not found; expected a CSV with header {expected} next to the images")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in LABEL_COLUMNS if c not in header]
        extra = [c for c in header if c not in LABEL_COLUMNS]
        if missing or extra or len(header) != len(set(header)):
            raise ValueError(f"{csv_path}: header {','.join(header) or '(empty)'} does not match {expected} "
                             f"(missing: {missing or 'none'}, extra: {extra or 'none'})")
        columns = [header.index(c) for c in LABEL_COLUMNS]
        rows, seen = [], {}
        for line, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{csv_path}: line {line} has {len(row)} fields, expected {len(header)} ({expected})")
            name, *texts = (row[k].strip() for k in columns)
            values = []
            for column, text in zip(LABEL_COLUMNS[1:], texts):
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise ValueError(f"{csv_path}: line {line}: {column}={text!r} is not a finite number "
                                     f"(expected pixel coordinates in the original image)")
                values.append(value)
            if not name:
                raise ValueError(f"{csv_path}: line {line}: empty filename")
            if name in seen:  # even with equal labels: one image, one row
                raise ValueError(f"{csv_path}: {name} is listed twice (lines {seen[name]} and {line}); "
                                 "expected one row per image")
            seen[name] = line
            rows.append((name, *values))
    if not rows:
        raise ValueError(f"{csv_path}: no label rows below the header {expected}")
    absent = [r[0] for r in rows if not (csv_path.parent / r[0]).is_file()]
    if absent:
        shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise ValueError(f"{csv_path}: {len(absent)} listed image file(s) missing from {csv_path.parent}: {shown}")
    return rows


def load_backgrounds(folder) -> tuple[np.ndarray, ...]:
    """The images directly inside folder (BACKGROUND_SUFFIXES, any case; other files and subfolders are
    ignored), as (h, w, 3) uint8 RGB shrunk to at most _USER_MAX_SIDE px on the long side, in name order.
    A missing folder, a file, a folder without images or an image that cannot be read is one ValueError
    naming --backgrounds and the file."""
    path = Path(folder)
    expected = f"expected a folder of images ({', '.join(BACKGROUND_SUFFIXES)})"
    if not path.exists():
        raise ValueError(f"--backgrounds {path}: no such folder; {expected}")
    if not path.is_dir():
        raise ValueError(f"--backgrounds {path}: not a folder; {expected}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in BACKGROUND_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--backgrounds {path}: no images in it; {expected}")
    images = []
    for file in files:
        try:
            image = load_image(file)
        except ValueError as e:
            raise ValueError(f"--backgrounds {e}") from None
        # kept for the whole run in every worker: the largest crops need no more than this
        shrink = _USER_MAX_SIDE / max(image.shape[:2])
        if shrink < 1:
            image = cv2.resize(image, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        images.append(image)
    return tuple(images)


def export(out_dir, n: int, seed: int = 0, render: RenderConfig = RenderConfig(), backgrounds: tuple = ()) -> Path:
    """Write n CAPTCHAs as PNGs plus labels.csv (original px, 3 decimals) into an empty or new
    directory; sample i is generate_captcha((seed, 0, i), render, backgrounds), i.e. with the default
    render the validation set of that seed."""
    out = Path(out_dir)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rows = [LABEL_COLUMNS]
    for i in range(n):
        s = generate_captcha((seed, 0, i), render, backgrounds)
        name = f"captcha_{i:06d}.png"
        if not cv2.imwrite(str(out / name), cv2.cvtColor(s["image"], cv2.COLOR_RGB2BGR)):
            raise OSError(f"{out / name}: could not write PNG")
        rows.append((name, *(f"{v:.3f}" for v in (*s["gap"], *s["slider"]))))
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out / "labels.csv"
