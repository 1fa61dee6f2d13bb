"""The two datasets train_captcha.py reads: online synthetic samples and a user's labelled folder.
Both yield the same items (see _pack), with every coordinate in canvas px."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .image import letterbox, to_input_tensor
from .io import _read_labels, load_image
from .render import CATEGORIES, MAX_FAKE_GAPS, RenderConfig, generate_captcha


def _pack(image: np.ndarray, gap, slider, fake_gaps, angle: float, category: int, index: int) -> dict:
    """Letterbox one sample and turn its labels into canvas-px tensors."""
    canvas, mask, scale, (pad_x, pad_y) = letterbox(image)
    # a fixed number of fake-gap slots plus a validity mask, so items with 0, 1 or 2 fakes collate
    fakes = np.zeros((MAX_FAKE_GAPS, 2), np.float32)
    fake_mask = np.zeros(MAX_FAKE_GAPS, bool)
    for k, (x, y) in enumerate(fake_gaps[:MAX_FAKE_GAPS]):
        fakes[k] = (x * scale + pad_x, y * scale + pad_y)
        fake_mask[k] = True
    point = lambda p: torch.tensor((p[0] * scale + pad_x, p[1] * scale + pad_y), dtype=torch.float32)
    return {"image": to_input_tensor(canvas, mask), "gap": point(gap), "slider": point(slider),
            "fake_gaps": torch.from_numpy(fakes), "fake_mask": torch.from_numpy(fake_mask),
            "angle": torch.tensor(angle, dtype=torch.float32), "category": torch.tensor(category, dtype=torch.int64),
            "scale": torch.tensor(scale, dtype=torch.float32), "pad": torch.tensor((pad_x, pad_y), dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64)}


class SyntheticCaptchaDataset(Dataset):
    """Online synthetic CAPTCHAs letterboxed to the canvas; labels in canvas px.

    Item i of epoch e is generate_captcha((seed, e, i), render, backgrounds) when fresh_each_epoch
    (training: new samples every epoch, reproducible from the seed), else always (seed, 0, i) (a fixed
    validation set, the same samples `export(dir, n, seed, render)` writes). Call set_epoch before the
    epoch's DataLoader iterator is created: workers copy the dataset when the iterator starts,
    so persistent_workers=True would keep them on the old epoch.
    """

    def __init__(self, size: int, seed: int, fresh_each_epoch: bool = True, render: RenderConfig = RenderConfig(),
                 backgrounds: tuple = ()):
        if size < 1 or seed < 0:
            raise ValueError(f"SyntheticCaptchaDataset needs size >= 1 and seed >= 0, got size={size}, seed={seed}")
        self.size, self.seed, self.fresh_each_epoch, self.epoch = int(size), int(seed), fresh_each_epoch, 0
        self.render, self.backgrounds = render, tuple(backgrounds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        s = generate_captcha((self.seed, self.epoch if self.fresh_each_epoch else 0, int(i)), self.render,
                             self.backgrounds)
        return _pack(s["image"], s["gap"], s["slider"], s["fake_gaps"], s["angle"],
                     CATEGORIES.index(s["category"]), i)


class CaptchaFolderDataset(Dataset):
    """User images: DIR/labels.csv (filename,gap_x,gap_y,slider_x,slider_y in original px) plus
    the images in DIR. Same items as SyntheticCaptchaDataset, with no fake gaps, angle 0 and
    category -1. labels.csv (columns, numbers, one row per image) and the presence of its images are
    validated up front; an image that cannot be decoded or is smaller than MIN_IMAGE_SIDE raises when its item
    is read. Any problem is one ValueError naming the file."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory; expected a folder with labels.csv and images")
        self.rows = _read_labels(self.root / "labels.csv")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        name, gx, gy, sx, sy = self.rows[i]
        image = load_image(self.root / name)
        h, w = image.shape[:2]
        if not all(0 <= x <= w and 0 <= y <= h for x, y in ((gx, gy), (sx, sy))):
            raise ValueError(f"{self.root / 'labels.csv'}: labels of {name} lie outside its {w}x{h} image")
        return _pack(image, (gx, gy), (sx, sy), [], 0.0, -1, i)
