"""UniAD training loss (reference/anomaly.md §1.4): mean squared error between reconstructed and aligned features.

feature_rec (B, C, h, w) is the reconstruction module's output, feature_align (B, C, h, w) the frozen backbone's
multi-scale features after the MFCN neck (UniAD at 224 px: C = 272, h = w = 14). The target is the clean
feature_align, also when feature jitter perturbed the reconstruction's input (§1.3 step 2). Nothing sees an
anomaly during training: no pixel or classification term.

The target is not detached here: UniAD's backbone is frozen (requires_grad False), so no gradient reaches it
anyway, and an experiment that unfreezes the backbone should see the same gradient UniAD's nn.MSELoss gives.
A further term would be one more (name, weight) pair added in train_anomaly.py, so this stays a plain function.
The score map used at evaluation is ``metrics.anomaly.anomaly_map``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_mse(feature_rec: torch.Tensor, feature_align: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean over B, C, h, w of (feature_rec - feature_align)^2 (UniAD's FeatureMSELoss, weight 1).

    Computed in float32 under autocast. Returns (loss, {"loss/feature_mse": loss.detach()}). A mean over every
    element, so --grad_accum k with batch b gives the gradient of batch k * b.
    """
    if feature_rec.shape != feature_align.shape:
        raise ValueError(f"feature_rec and feature_align shapes differ: {tuple(feature_rec.shape)} vs "
                         f"{tuple(feature_align.shape)}")
    loss = F.mse_loss(feature_rec.float(), feature_align.float())
    return loss, {"loss/feature_mse": loss.detach()}
