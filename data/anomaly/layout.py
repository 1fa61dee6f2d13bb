"""Listing, validating and splitting anomaly-detection data into records (see the package docstring for the
layouts). Everything here is cheap: files are listed and their sizes read from the image headers (PIL decodes
no pixels), so a missing mask, an unreadable file or a mask of the wrong size fails before training starts, as
one ValueError naming the file and what was expected.
"""
from __future__ import annotations

import json
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")   # compared lower-case: VisA has .JPG
NORMAL = "good"                                                        # MVTec's folder name for normal images


@dataclass(frozen=True)
class Record:
    """One image. `defect` is "good" for normal images, else the defect type (MVTec: the test/ sub-folder).
    `mask` is a binary mask file (pixels > 0 are anomalous) or None: for a normal image the mask is all zeros,
    for a defective one it is unknown (`has_mask` False), and pixel metrics must skip the image."""
    path: str
    category: str
    label: int              # 0 normal, 1 anomalous
    defect: str
    mask: str | None = None

    @property
    def has_mask(self) -> bool:
        return self.label == 0 or self.mask is not None


class Splits(NamedTuple):
    """train / val (normal images carved from train, see split_val) / test records, each sorted by category
    then path, and the category names; a category's index in `categories` is its id in AnomalyDataset items."""
    train: list[Record]
    val: list[Record]
    test: list[Record]
    categories: tuple[str, ...]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_size(path, what: str = "image") -> tuple[int, int]:
    """(width, height) px from the file header; ValueError naming the file if it is missing or not an image."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {e}); expected an image file "
                         f"({', '.join(IMAGE_EXTENSIONS)})") from None


def validate(records: Sequence[Record]) -> None:
    """Header checks of every image and mask: readable, and a mask as large as its image."""
    for r in records:
        w, h = image_size(r.path)
        if r.mask is not None:
            mw, mh = image_size(r.mask, "mask")
            if (mw, mh) != (w, h):
                raise ValueError(f"{r.mask}: mask is {mw}x{mh} px but its image {r.path} is {w}x{h} px; "
                                 "expected a mask of the image's size")


def _select(found: Sequence[str], categories: Sequence[str] | None, where) -> list[str]:
    """The requested categories (all found ones when None), sorted so that class ids do not depend on the
    order they were asked for in."""
    if categories is None:
        return sorted(found)
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in found]
    if unknown or not categories:
        raise ValueError(f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(unknown) or '(none)'} requested; found: {', '.join(sorted(found)) or '(none)'}")
    return sorted(set(categories))


def find_categories(root) -> list[str]:
    """Sorted names of the folders in root that hold a train/ or test/ folder (MVTec / VisA layout)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory; expected a dataset folder <root>/<category>/train/good/...")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def _mask_for(image: Path, gt_dir: Path) -> str:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):   # MVTec, VisA
        if (gt_dir / name).is_file():
            return str(gt_dir / name)
    for p in _images(gt_dir):   # other image formats, same two stems
        if p.stem in (f"{image.stem}_mask", image.stem):
            return str(p)
    raise ValueError(f"{image}: defective test image has no mask in {gt_dir} (expected {image.stem}_mask.png or "
                     f"{image.stem}.png; remove the ground_truth folder of this defect if it has no masks)")


def _test_records(root: Path, name: str) -> list[Record]:
    """test/good (label 0) and test/<defect> (label 1) of one category; a defect folder with a
    ground_truth/<defect> folder needs a mask for each image, one without it gives records with mask None
    (classification-only data)."""
    records, test_dir = [], root / name / "test"
    for sub in sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []:
        if sub.name == NORMAL:
            records += [Record(str(p), name, 0, NORMAL) for p in _images(sub)]
            continue
        gt_dir = root / name / "ground_truth" / sub.name
        for p in _images(sub):
            records.append(Record(str(p), name, 1, sub.name, _mask_for(p, gt_dir) if gt_dir.is_dir() else None))
    return records


def list_folder(root, categories: Sequence[str] | None = None) -> tuple[list[Record], list[Record]]:
    """(train, test) records of an MVTec-layout folder; every selected category needs train/good images."""
    root = Path(root)
    names = _select(find_categories(root), categories, root)
    if not names:
        raise ValueError(f"{root}: no category folders; expected <root>/<category>/train/good/*.png")
    train, test = [], []
    for name in names:
        good = root / name / "train" / NORMAL
        files = _images(good) if good.is_dir() else []
        if not files:
            raise ValueError(f"{good}: no images; every category needs normal training images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        train += [Record(str(p), name, 0, NORMAL) for p in files]
        test += _test_records(root, name)
    return train, test


def list_test(root, categories: Sequence[str] | None = None) -> list[Record]:
    """Test records of an MVTec-layout folder (no training images needed: e.g. prediction on a test set);
    categories default to every folder with a test/ folder. Not validated: see validate."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory; expected <root>/<category>/test/<good or defect>/...")
    found = sorted(d.name for d in root.iterdir() if (d / "test").is_dir())
    records = [r for name in _select(found, categories, root) for r in _test_records(root, name)]
    if not records:
        raise ValueError(f"{root}: no test images in <category>/test/<good or defect>/ "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return records


def _meta_record(obj, where: str, image_dir: Path) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("filename", "label") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; keys found: {', '.join(obj) or '(none)'}")
    filename, label = obj["filename"], obj["label"]
    if not isinstance(filename, str) or not filename.strip():
        raise ValueError(f"{where}: filename is {json.dumps(filename)}, expected a non-empty path string")
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"{where}: label is {json.dumps(label)}, expected 0 (normal) or 1 (defective)")
    category = obj.get("clsname")
    if category is None:
        parts = filename.split("/")
        if len(parts) < 4:   # UniAD's fallback: <category>/<split>/<defect>/<file>
            raise ValueError(f"{where}: no clsname, and filename {filename!r} has fewer than 4 path parts to take the "
                             "category from (<category>/test/<defect>/<file>); add a \"clsname\" key")
        category = parts[-4]
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"{where}: clsname is {json.dumps(category)}, expected a non-empty string")
    path = image_dir / filename
    if not path.is_file():
        raise ValueError(f"{where}: image {filename!r} not found (looked for {path})")
    maskname, mask = obj.get("maskname"), None
    if maskname is not None:
        if not isinstance(maskname, str) or not maskname.strip():
            raise ValueError(f"{where}: maskname is {json.dumps(maskname)}, expected a path string or no key")
        if not (image_dir / maskname).is_file():
            raise ValueError(f"{where}: mask {maskname!r} not found (looked for {image_dir / maskname})")
        mask = str(image_dir / maskname)
    if label == 0:
        defect = NORMAL
    else:   # MVTec's label_name is just "defective": the folder name says more
        label_name = obj.get("label_name")
        defect = (label_name if isinstance(label_name, str) and label_name not in ("", NORMAL, "defective")
                  else Path(filename).parent.name or "defective")
    return Record(str(path), category, label, defect, mask)


def read_meta(path, image_dir, normal_only: bool = False) -> list[Record]:
    """Records of a UniAD JSON-lines meta file (one object per line, blank lines skipped): filename and label
    (0/1) required; clsname (default filename.split('/')[-4]), maskname and label_name optional; paths relative
    to image_dir. normal_only: refuse label 1 (a training file). ValueError naming the file and line."""
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise ValueError(f"{path}: meta file not found; expected UniAD JSON lines "
                         "({\"filename\": ..., \"label\": ...})")
    records, seen = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path}: line {line}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON "
                                     "object per line") from None
                record = _meta_record(obj, where, image_dir)
                if normal_only and record.label != 0:
                    raise ValueError(f"{where}: label 1 in a training meta file; UniAD trains on normal images only")
                if record.path in seen:
                    raise ValueError(f"{where}: {obj['filename']} is already listed on line {seen[record.path]}")
                seen[record.path] = line
                records.append(record)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    return records


def split_val(train: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val): per category, round(val_fraction * n) (at least 1 when val_fraction > 0) of its n normal
    training images, drawn by a permutation seeded with (seed, crc32 of the category name). The draw depends only
    on the category's own files, so adding or dropping other categories does not change it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    by_category = defaultdict(list)
    for r in train:
        if r.label != 0:
            raise ValueError(f"{r.path}: a defective image among the training records; expected normal images only")
        by_category[r.category].append(r)
    kept, val = [], []
    for name in sorted(by_category):
        items = sorted(by_category[name], key=lambda r: r.path)
        n_val = max(1, round(val_fraction * len(items))) if val_fraction > 0 else 0
        if n_val >= len(items):
            raise ValueError(f"category {name!r} has {len(items)} training image(s); val_fraction {val_fraction} "
                             "would leave none to train on")
        chosen = set(np.random.default_rng([int(seed), zlib.crc32(name.encode())]).permutation(len(items))[:n_val])
        for i, r in enumerate(items):
            (val if i in chosen else kept).append(r)
    return kept, val


def load_splits(root, categories: Sequence[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                train_meta=None, test_meta=None) -> Splits:
    """Train/val/test records of one dataset, validated (see validate). Without meta files, root is an
    MVTec-layout folder; with train_meta and test_meta (UniAD JSON lines, both or neither), root is the image
    folder their paths are relative to. categories: a subset (default: all categories of the training data);
    test images of other categories are dropped, and a test category without training images is an error."""
    if (train_meta is None) != (test_meta is None):
        raise ValueError(f"train_meta={train_meta} test_meta={test_meta}: give both meta files or neither")
    if train_meta is None:
        train, test = list_folder(root, categories)
    else:
        if not Path(root).is_dir():
            raise ValueError(f"{root}: not a directory; expected the image folder the meta files' paths start from")
        every = read_meta(train_meta, root, normal_only=True)
        names = _select({r.category for r in every}, categories, train_meta)
        train = [r for r in every if r.category in names]
        test = read_meta(test_meta, root)
        orphans = sorted({r.category for r in test} - {r.category for r in every})
        if orphans:
            raise ValueError(f"{test_meta}: categor{'y' if len(orphans) == 1 else 'ies'} {', '.join(orphans)} "
                             f"{'has' if len(orphans) == 1 else 'have'} no training images in {train_meta}")
        test = [r for r in test if r.category in names]
    train, val = split_val(train, val_fraction, seed)
    validate(train + val + test)
    order = lambda r: (r.category, r.path)
    return Splits(sorted(train, key=order), sorted(val, key=order), sorted(test, key=order),
                  tuple(sorted({r.category for r in train})))
