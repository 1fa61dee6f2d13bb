"""Losses for the same-digit pair classifier, on logits (B,) and 0/1 targets (B,).

Both return ``(loss, {"loss/<name>": value})`` and average over the batch, so
``--grad_accum k`` with batch b gives the gradient of batch k*b.

Focal loss (Lin et al. 2017) with label smoothing, as in the original stage-2 recipe:
    t = y (1 - eps) + eps / 2          smoothed target
    bce = -[t log p + (1 - t) log(1 - p)],   p = sigmoid(z)
    p_t = exp(-bce)                    the probability the model gives to the (smoothed) target
    loss = alpha (1 - p_t)^gamma bce
With gamma = 0, alpha = 1 and eps = 0 it is plain BCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_targets(target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """0/1 targets pulled towards 0.5: 1 -> 1 - eps/2, 0 -> eps/2."""
    return target.float() * (1.0 - label_smoothing) + 0.5 * label_smoothing


def bce_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0):
    """Binary cross-entropy with logits. logits, target: (B,)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), smooth_targets(target, label_smoothing))
    return loss, {"loss/bce": loss.detach()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
               label_smoothing: float = 0.1):
    """Focal loss on logits (B,) against 0/1 targets (B,); computed in float32 under autocast."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), smooth_targets(target, label_smoothing),
                                             reduction="none")
    p_t = torch.exp(-bce)
    loss = (alpha * (1.0 - p_t) ** gamma * bce).mean()
    return loss, {"loss/focal": loss.detach(), "loss/bce": bce.detach().mean()}


def digit_loss(digits_a: torch.Tensor, digits_b: torch.Tensor, label_a: torch.Tensor, label_b: torch.Tensor):
    """Auxiliary cross-entropy of each half's digit class: logits (B, classes), labels int64 (B,); the mean
    over the 2B digits of the batch."""
    loss = F.cross_entropy(torch.cat([digits_a, digits_b]).float(), torch.cat([label_a, label_b]))
    return loss, {"loss/digit": loss.detach()}
