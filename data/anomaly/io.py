"""Files that anomaly predictions are written as, and the pictures drawn from them.

    maps        OUT/<category>/<defect>/<stem>.npy, float32 (H, W) at the model's input size: the layout the
                MVTec AD evaluation scripts read (one map per test image, named after it)
    scores.csv  category, path, defect, score, threshold, is_anomalous (one row per image)
    overlays    RGB PNGs: the image with its anomaly map as a JET heat map on top (0 = threshold / 2,
                full red = 2 x threshold by default), and binary masks (255 where map >= pixel threshold)
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from .dataset import IMAGENET_MEAN, IMAGENET_STD

SCORE_COLUMNS = ("category", "path", "defect", "score", "threshold", "is_anomalous")


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) tensor back to (H, W, 3) uint8 RGB."""
    x = image.detach().float().cpu() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` blended with the JET colouring of ``amap`` (H, W) scaled so that ``low`` is blue
    and ``high`` red; pixels below ``low`` keep the image untouched, so normal regions stay readable."""
    scaled = np.clip((amap - low) / max(high - low, 1e-12), 0, 1)
    heat = cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    weight = (alpha * (amap >= low))[..., None]
    return (rgb * (1 - weight) + heat * weight).round().astype(np.uint8)


def map_path(out: Path, category: str, defect: str, image_path: str, suffix: str = ".npy") -> Path:
    """OUT/<category>/<defect>/<stem><suffix>."""
    return Path(out) / category / defect / (Path(image_path).stem + suffix)


def write_png(path: Path, rgb_or_grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise ValueError(f"{path}: could not write the PNG")


def write_scores(path: Path, rows: Sequence[dict]) -> None:
    """scores.csv with SCORE_COLUMNS; floats with 6 significant digits, is_anomalous as 0/1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCORE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "score": f"{row['score']:.6g}", "threshold": f"{row['threshold']:.6g}",
                             "is_anomalous": int(row["is_anomalous"])})
