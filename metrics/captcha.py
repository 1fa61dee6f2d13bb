"""Decoding and metrics for gap/slider localisation.

Errors are in canvas pixels (the 512x256 letterboxed input), as in the original project:
per point err = mean(|dx|, |dy|); per sample = (gap_err + slider_err) / 2;
``hit_le_k`` = percentage of samples with error <= k px. Also reported: the slide-distance
error |(gx - sx)_pred - (gx - sx)_true| that a real CAPTCHA checks, and Euclidean errors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from losses.captcha import valid_cells

STRIDE = 4


def plateau_centre(logits: torch.Tensor, flat: torch.Tensor, iters: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (row, col), in cells, of the flat top that contains each argmax.

    A heatmap head whose hidden ReLU features all switch off at the target outputs exactly its
    bias over several neighbouring cells; a plain argmax then returns the first tied cell in
    row-major order, i.e. the top-left of the plateau (a systematic upward shift of several px).
    The tied cells connected to the argmax are grown by 3x3 max-pooling within the plateau (up to
    ``iters`` cells away) and averaged. A unique maximum is returned unchanged.
    logits: (B, h, w); flat: (B,) argmax indices.
    """
    b, h, w = logits.shape
    peak = logits.flatten(1).gather(1, flat[:, None])[:, :, None]
    on = (logits >= peak).float()
    region = torch.zeros_like(on).flatten(1).scatter_(1, flat[:, None], 1.0).view(b, h, w)
    for _ in range(iters):
        region = F.max_pool2d(region[:, None], 3, stride=1, padding=1)[:, 0] * on
    rows = torch.arange(h, device=logits.device, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, device=logits.device, dtype=torch.float32)[None, None, :]
    total = region.flatten(1).sum(1)
    return (region * rows).flatten(1).sum(1) / total, (region * cols).flatten(1).sum(1) / total


@torch.no_grad()
def decode(outputs: dict, valid: torch.Tensor, stride: int = STRIDE):
    """Peak of each padding-masked heatmap (centre of its flat top) plus the sub-cell offset there.

    outputs: model dict; valid: (B, h, w) bool. Returns points (B, 2, 2) = (gap, slider) x (x, y)
    in canvas px and scores (B, 2) = sigmoid peak values.
    """
    points, scores = [], []
    for k, name in enumerate(("gap", "slider")):
        logits = outputs[name][:, 0].float().masked_fill(~valid, float("-inf"))
        b, h, w = logits.shape
        peak, flat = logits.flatten(1).max(1)
        ci, cj = plateau_centre(logits, flat)
        i, j = ci.round().long(), cj.round().long()
        off = outputs["offset"][torch.arange(b, device=flat.device), 2 * k:2 * k + 2, i, j].float()
        points.append(torch.stack([(cj + 0.5 + off[:, 0]) * stride, (ci + 0.5 + off[:, 1]) * stride], dim=1))
        scores.append(torch.sigmoid(peak))
    return torch.stack(points, dim=1), torch.stack(scores, dim=1)


@torch.no_grad()
def decode_on(outputs: dict, image: torch.Tensor):
    """decode of a model's outputs on the (B, 4, H, W) canvas batch they came from, at the stride their
    shapes give (4, or 4 x input_scale for a model that shrinks its input), padding cells masked
    -> points (B, 2, 2) in canvas px, scores (B, 2). Works alike for PyTorch, ONNX and wrapped models."""
    stride = image.shape[-1] // outputs["gap"].shape[-1]
    return decode(outputs, valid_cells(image, stride), stride)


@torch.no_grad()
def predict_points(model, image: torch.Tensor):
    """decode_on(model(image), image): points (B, 2, 2) in canvas px, scores (B, 2)."""
    return decode_on(model(image), image)


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
