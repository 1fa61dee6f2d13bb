"""Decoding and metrics for gap/slider localisation.

Errors are in canvas pixels (the 512x256 letterboxed input), as in the original project:
per point err = mean(|dx|, |dy|); per sample = (gap_err + slider_err) / 2;
``hit_le_k`` = percentage of samples with error <= k px. Also reported: the slide-distance
error |(gx - sx)_pred - (gx - sx)_true| that a real CAPTCHA checks, and Euclidean errors.
"""
from __future__ import annotations

import numpy as np
import torch

STRIDE = 4


@torch.no_grad()
def decode(outputs: dict, valid: torch.Tensor, stride: int = STRIDE):
    """Argmax of each padding-masked heatmap plus its sub-cell offset.

    outputs: model dict; valid: (B, h, w) bool. Returns points (B, 2, 2) = (gap, slider) x (x, y)
    in canvas px and scores (B, 2) = sigmoid peak values.
    """
    points, scores = [], []
    for k, name in enumerate(("gap", "slider")):
        logits = outputs[name][:, 0].float().masked_fill(~valid, float("-inf"))
        b, h, w = logits.shape
        peak, flat = logits.flatten(1).max(1)
        i, j = flat // w, flat % w
        off = outputs["offset"][torch.arange(b, device=flat.device), 2 * k:2 * k + 2, i, j].float()
        points.append(torch.stack([(j + 0.5 + off[:, 0]) * stride, (i + 0.5 + off[:, 1]) * stride], dim=1))
        scores.append(torch.sigmoid(peak))
    return torch.stack(points, dim=1), torch.stack(scores, dim=1)


def point_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """pred, true: (N, 2, 2) = (gap, slider) x (x, y). Per-sample error arrays."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    diff = np.abs(pred - true)
    gap, slider = diff[:, 0].mean(1), diff[:, 1].mean(1)
    slide = np.abs((pred[:, 0, 0] - pred[:, 1, 0]) - (true[:, 0, 0] - true[:, 1, 0]))
    euclid = np.linalg.norm(pred - true, axis=2)
    return {"combined": (gap + slider) / 2, "gap": gap, "slider": slider, "slide": slide,
            "gap_euclid": euclid[:, 0], "slider_euclid": euclid[:, 1]}


def captcha_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dataset-level metrics from gathered per-sample predictions (canvas px)."""
    e = point_errors(pred, true)
    c = e["combined"]
    return {
        "mae_px": float(c.mean()),
        "rmse_px": float(np.sqrt((c**2).mean())),
        "hit_le_1px": float(100 * (c <= 1).mean()),
        "hit_le_2px": float(100 * (c <= 2).mean()),
        "hit_le_5px": float(100 * (c <= 5).mean()),
        "gap_mae": float(e["gap"].mean()),
        "slider_mae": float(e["slider"].mean()),
        "slide_mae_px": float(e["slide"].mean()),
        "slide_hit_le_5px": float(100 * (e["slide"] <= 5).mean()),
        "gap_euclid_px": float(e["gap_euclid"].mean()),
        "slider_euclid_px": float(e["slider_euclid"].mean()),
    }
