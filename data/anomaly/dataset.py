"""The torch Dataset of anomaly-detection records: UniAD's input pipeline, deterministic and without
augmentation (UniAD trains without it, anomaly.md §2)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .layout import Record
from .synth import DEFECTS, add_defect

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size_hw(input_size) -> tuple[int, int]:
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"input_size must be a positive int or (height, width), got {input_size!r}")
    return h, w


def _open(path: str, what: str) -> Image.Image:
    """A decoded PIL image; ValueError naming the file when it is missing, truncated or not an image."""
    try:
        with Image.open(path) as im:
            im.load()   # decodes every pixel: a truncated file fails here, not in a worker's collate
            return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode {what} ({type(e).__name__}: {e})") from None


def resized_rgb(im: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB resized with PIL bilinear (antialiased when shrinking, as torchvision's Resize on PIL
    images in UniAD)."""
    return np.asarray(im.convert("RGB").resize(size_hw[::-1], Image.BILINEAR))


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 scaled to [0, 1] and normalised with the ImageNet mean and std."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def image_tensor(im: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float32 model input of a PIL image: normalise(resized_rgb(im, size_hw))."""
    return normalise(resized_rgb(im, size_hw))


def load_image(path: str, size_hw: tuple[int, int]) -> torch.Tensor:
    """image_tensor of a file; ValueError naming the file when it cannot be decoded."""
    return image_tensor(_open(path, "image"), size_hw)


def load_mask(path: str, size_hw: tuple[int, int], image_wh: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, H, W) float32 in {0, 1}: pixels > 0 of the file (any colour channel) are anomalous; binarised
    before the NEAREST resize so that grey levels of a 0/1 or 0/255 mask mean the same."""
    im = _open(path, "mask")
    if image_wh is not None and im.size != tuple(image_wh):
        raise ValueError(f"{path}: mask is {im.size[0]}x{im.size[1]} px but its image is "
                         f"{image_wh[0]}x{image_wh[1]} px; expected a mask of the image's size")
    a = np.asarray(im.convert("RGB") if "A" in im.getbands() else im)   # an alpha channel is not a label
    a = a.any(-1) if a.ndim == 3 else a > 0
    m = Image.fromarray(a.astype(np.uint8) * 255).resize(size_hw[::-1], Image.NEAREST)
    return torch.from_numpy(np.asarray(m) > 0).to(torch.float32)[None]


class AnomalyDataset(Dataset):
    """Records (layout.py) as model inputs. Item i is a dict:
        image     (3, H, W) float32, ImageNet-normalised (load_image); (H, W) = input_size
        mask      (1, H, W) float32 in {0, 1}, NEAREST-resized; zeros for normal images and for defective
                  images without a mask file (see has_mask)
        has_mask  bool tensor: False for a defective image without a mask (pixel metrics must skip it; UniAD
                  instead invented an all-anomalous mask, anomaly.md §8 bug 6)
        label     int64 tensor, 0 normal / 1 anomalous, always from the record, never from the mask
        category  int64 tensor, index of the record's category in `categories`
        index     int64 tensor, i
        path, defect   str (collated into lists)
    """

    def __init__(self, records: Sequence[Record], categories: Sequence[str], input_size: int | tuple[int, int] = 224):
        self.records = list(records)
        self.categories = tuple(categories)
        self.size_hw = _size_hw(input_size)
        unknown = sorted({r.category for r in self.records} - set(self.categories))
        if unknown:
            raise ValueError(f"records of categories {', '.join(unknown)} are not in categories "
                             f"({', '.join(self.categories) or 'none'}); pass the training categories")
        self._ids = {name: k for k, name in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        im = _open(r.path, "image")
        image = image_tensor(im, self.size_hw)
        if r.mask is not None:
            mask = load_mask(r.mask, self.size_hw, im.size)
        else:
            mask = torch.zeros((1, *self.size_hw), dtype=torch.float32)
        return {"image": image, "mask": mask, "has_mask": torch.tensor(r.has_mask),
                "label": torch.tensor(r.label, dtype=torch.int64),
                "category": torch.tensor(self._ids[r.category], dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64), "path": str(Path(r.path)), "defect": r.defect}


class SyntheticDefects(Dataset):
    """Normal images plus synthetic defective copies with exact masks, for validation without real defects
    (the validation split holds normal images only). Items 0..n-1 are those of `base` (normal records only);
    item n + c * n + i is copy c of base item i with one defect of `kinds` drawn by synth.add_defect on the
    resized image (a texture-style defect, anywhere in the image: the object outline is unknown here). The
    defect and its place are a pure function of (seed, i, c). Defective items have label 1, has_mask True,
    defect "synthetic_<kind>", and the path of the image they were made from; keys as in AnomalyDataset."""

    def __init__(self, base: AnomalyDataset, copies: int = 1, seed: int = 0,
                 kinds: Sequence[str] = tuple(d for d in DEFECTS if d != "missing")):
        h, w = base.size_hw
        if h != w:
            raise ValueError(f"SyntheticDefects needs a square input_size, got {h}x{w}")
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
            raise ValueError(f"copies must be an integer >= 0, got {copies!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        bad = [k for k in kinds if k not in DEFECTS or k == "missing"]
        if bad or not kinds:
            raise ValueError(f"kinds {list(kinds)}: expected some of {', '.join(d for d in DEFECTS if d != 'missing')}")
        defective = [r.path for r in base.records if r.label != 0]
        if defective:
            raise ValueError(f"{defective[0]}: SyntheticDefects takes normal images only ({len(defective)} defective)")
        self.base, self.copies, self.seed, self.kinds = base, copies, seed, tuple(kinds)

    def __len__(self) -> int:
        return len(self.base) * (1 + self.copies)

    def __getitem__(self, j: int) -> dict:
        n = len(self.base)
        if not 0 <= j < len(self):
            raise IndexError(f"index {j} out of range for {len(self)} items")
        if j < n:
            return self.base[j]
        copy, i = divmod(j - n, n)
        r = self.base.records[i]
        rng = np.random.default_rng([self.seed, i, copy, 0x5D])   # 0x5D: a stream no other draw of this seed uses
        kind = self.kinds[rng.integers(len(self.kinds))]
        image, mask = add_defect(resized_rgb(_open(r.path, "image"), self.base.size_hw), kind, rng)
        return {"image": normalise(image), "mask": torch.from_numpy(mask).to(torch.float32)[None],
                "has_mask": torch.tensor(True), "label": torch.tensor(1, dtype=torch.int64),
                "category": torch.tensor(self.base.categories.index(r.category), dtype=torch.int64),
                "index": torch.tensor(j, dtype=torch.int64), "path": str(Path(r.path)), "defect": f"synthetic_{kind}"}
