"""CenterNet-style losses for gap/slider localisation on stride-s heatmaps (s = 4, or 4 x input_scale for a
model that shrinks its input; the helpers take it as ``stride``, captcha_loss reads it from the shapes).

Coordinates are canvas pixels (the 512x256 letterboxed input). A point (x, y) falls in
output cell (j, i) = (floor(x/s), floor(y/s)) and has sub-cell offset
(x/s - j - 0.5, y/s - i - 0.5) in [-0.5, 0.5); decoding is x = (j + 0.5 + du) * s.
Every term is a per-sample quantity averaged over the batch, so ``--grad_accum k`` with
batch b gives the same gradient as batch k*b.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STRIDE = 4


def valid_cells(image: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """(B, 4, H, W) input whose 4th channel is the padding mask -> (B, H/s, W/s) bool of real-image cells."""
    return F.avg_pool2d(image[:, 3:4].float(), stride).squeeze(1) >= 0.5


def encode_points(points: torch.Tensor, out_h: int, out_w: int, sigma: float = 1.5, stride: int = STRIDE):
    """Gaussian heatmap targets for one point per sample.

    points: (B, 2) canvas px (x, y). Returns heatmap (B, out_h, out_w) with value 1 at the
    peak cell and exp(-d^2 / 2 sigma^2) within radius 3 sigma, the peak cell index (B, 2) as
    (row i, col j) and the sub-cell offset (B, 2) as (du, dv).
    """
    u, v = points[:, 0] / stride, points[:, 1] / stride
    j = u.floor().clamp(0, out_w - 1)
    i = v.floor().clamp(0, out_h - 1)
    offset = torch.stack([u - j - 0.5, v - i - 0.5], dim=1)
    cols = torch.arange(out_w, device=points.device, dtype=points.dtype)
    rows = torch.arange(out_h, device=points.device, dtype=points.dtype)
    d2 = (cols[None, None, :] - j[:, None, None]) ** 2 + (rows[None, :, None] - i[:, None, None]) ** 2
    heat = torch.exp(-d2 / (2 * sigma**2))
    heat = torch.where(d2 <= int(3 * sigma) ** 2, heat, torch.zeros_like(heat))
    return heat, torch.stack([i, j], dim=1).long(), offset


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               alpha: float = 2.0, beta: float = 4.0, pos_threshold: float = 1.0) -> torch.Tensor:
    """CenterNet focal loss, per sample normalised by its positives, averaged over the batch.

    logits, target, valid: (B, H, W). Positives are cells with target >= pos_threshold
    (1.0 = the peak cell only, as in CenterNet; the original project used 0.8).
    """
    logits = logits.float()
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos = (target >= pos_threshold - 1e-6) & valid
    neg = ~pos & valid
    pos_term = -((1 - p) ** alpha) * log_p
    neg_term = -((1 - target) ** beta) * p**alpha * log_1mp
    per_sample = (pos_term * pos).flatten(1).sum(1) + (neg_term * neg).flatten(1).sum(1)
    return (per_sample / pos.flatten(1).sum(1).clamp(min=1)).mean()


def _at_cells(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """maps (B, C, H, W), cells (B, 2) as (i, j) -> (B, C) values at those cells."""
    b = torch.arange(maps.shape[0], device=maps.device)
    return maps[b, :, cells[:, 0], cells[:, 1]]


def sample_heatmap(heat: torch.Tensor, points: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Bilinear read of heat (B, H, W) at canvas points (B, K, 2) -> (B, K)."""
    h, w = heat.shape[-2:]
    gx = (points[..., 0] / stride - 0.5) / max(w - 1, 1) * 2 - 1  # cell centres sit at (j + 0.5) * stride
    gy = (points[..., 1] / stride - 0.5) / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[:, :, None, :]
    return F.grid_sample(heat[:, None], grid.to(heat.dtype), mode="bilinear", align_corners=True)[:, 0, :, 0]


def captcha_loss(outputs: dict, batch: dict, alpha: float = 2.0, beta: float = 4.0, pos_threshold: float = 1.0,
                 sigma: float = 1.5, offset_weight: float = 1.0, hard_negative_weight: float = 0.5,
                 hard_negative_margin: float = 0.2, angle_weight: float = 0.5):
    """Total loss and its parts. The stride (input px per output cell) is the image width over the heatmap
    width, so a model that shrinks its input (input_scale) and a halved batch (halve_canvas) need nothing else.

    outputs: the model's dict ("gap", "slider" logits (B,1,h,w); "offset" (B,4,h,w); optional "angle" (B,2,h,w)).
    batch: "image" (B,4,H,W), "gap"/"slider" (B,2) canvas px, "fake_gaps" (B,K,2), "fake_mask" (B,K), "angle" (B,) radians.
    """
    gap_logits, slider_logits = outputs["gap"][:, 0], outputs["slider"][:, 0]
    h, w = gap_logits.shape[-2:]
    stride = batch["image"].shape[-1] // w
    valid = valid_cells(batch["image"], stride)
    parts = {}
    gap_heat, gap_cell, gap_off = encode_points(batch["gap"].float(), h, w, sigma, stride)
    slider_heat, slider_cell, slider_off = encode_points(batch["slider"].float(), h, w, sigma, stride)
    parts["focal_gap"] = focal_loss(gap_logits, gap_heat, valid, alpha, beta, pos_threshold)
    parts["focal_slider"] = focal_loss(slider_logits, slider_heat, valid, alpha, beta, pos_threshold)

    offsets = outputs["offset"].float()
    # Only the peak cell learns an offset; training neighbours toward 0 caused 4-6 px errors
    # whenever the argmax landed one cell off (bug #5 of the original project).
    parts["offset"] = (F.l1_loss(_at_cells(offsets[:, 0:2], gap_cell), gap_off)
                       + F.l1_loss(_at_cells(offsets[:, 2:4], slider_cell), slider_off))
    total = parts["focal_gap"] + parts["focal_slider"] + offset_weight * parts["offset"]

    if hard_negative_weight > 0:
        heat = torch.sigmoid(gap_logits.float())
        s_true = sample_heatmap(heat, batch["gap"].float()[:, None], stride)    # (B, 1)
        s_fake = sample_heatmap(heat, batch["fake_gaps"].float(), stride)      # (B, K)
        mask = batch["fake_mask"].float()
        hinge = F.relu(hard_negative_margin - s_true + s_fake) * mask
        parts["hard_negative"] = (hinge.sum(1) / mask.sum(1).clamp(min=1)).mean()
        total = total + hard_negative_weight * parts["hard_negative"]

    if angle_weight > 0 and "angle" in outputs:
        pred = _at_cells(outputs["angle"].float(), gap_cell)                   # (B, 2) = (sin, cos)
        theta = batch["angle"].float()
        parts["angle"] = (1 - (pred[:, 0] * theta.sin() + pred[:, 1] * theta.cos())).mean()
        total = total + angle_weight * parts["angle"]
    return total, {f"loss/{k}": v.detach() for k, v in parts.items()}

