"""Post-processing of SigmaMUNet maps into detections (`detections_from_output`): DECODE's SpatialIntegration
+ look-up (smlm.md §5).

Input: the activated model output (B, 10, H, W), torch tensor or numpy array, in the channel layout of
models/sigma_munet.py (P_CH, MU_CH, SIGMA_CH, BG_CH): p; photons / phot_max, x offset px, y offset px,
z / z_max; their sigmas in the same units; bg / bg_max. Frame b of the batch gets frame index
frame_ix0 + b.

SpatialIntegration (DECODE's default post-processing), on the p map of each frame, thresholds raw_th and
split_th = 0.6:

    p_clip = p * [p > raw_th]
    mask1  = [p > raw_th] * [p == maxpool3x3(p_clip)]        local maxima above the threshold
    conv   = p convolved with [[0,1,0],[1,1,1],[0,1,0]]       centre + 4 neighbours, zero padding
    mask2  = [p * (1 - mask1) > split_th]                     a confident non-maximum: a second emitter
    p_new  = clamp(mask1 * conv + mask2 * conv, 0, 1)         (DECODE's "norm_sum" aggregation)

The factor [p > raw_th] in mask1 is written out; DECODE's `p == maxpool(p_clip)` alone would also mark a
pixel with p exactly 0 whose 3x3 neighbourhood is all below raw_th, which SigmaMUNet cannot produce
(p >= sigmoid(-8)) but hand-made maps can. Two equal maxima in one 3x3 neighbourhood are both maxima and
both kept (the reference rule; exact ties do not happen with real network outputs). Then the look-up: every
pixel with p_new >= raw_th is one detection with probability p_new and the values of all channels at that
pixel. DECODE's default is raw_th = 0.5 (smlm.md §5, §12); its fitting notebook uses 0.1.

Coordinates follow losses/smlm.py: pixel (row i, col j) has its centre at (x, y) = (j, i) px, so a
detection at that pixel sits at x = j + dx, y = i + dy px. Conversion to physical units (smlm.md §1.6,
`InverseParamListRescale`): photons = mu_phot * phot_max, z = mu_z * z_max nm, bg = bg * bg_max photons/px,
sigmas likewise; x_nm = x_px * px_size_nm[0], y_nm = y_px * px_size_nm[1] (the pixel centre (0, 0) is at
0 nm, as in DECODE's px -> nm conversion). The scales have no defaults: they are the run's simulation's
(SimConfig.phot_max, z_max, bg_max, px_size_nm), which the network's outputs were trained against.

Optional sigma filter (DECODE's fitting notebook): drop detections with sigma_x or sigma_y > 40 nm or
sigma_z > 80 nm; each limit may be None (not applied).

Detections are a dict of numpy arrays with one row each, ordered by frame then row-major pixel:
    frame_ix (N,) int64; prob (N,) integrated p_new; prob_raw (N,) p of the pixel itself
    pixel (N, 2) int64 (row i, col j) of the pixel the detection was read from, so x px - j is its offset
    param_out (N, 4)  (photons / phot_max, x px, y px, z / z_max): the target layout of losses/smlm.py
    sigma_out (N, 4)  the sigmas in the same units
    xyz_px (N, 3)     x px, y px, z nm (DECODE's EmitterSet convention: z is always nm)
    xyz_nm (N, 3)     x, y, z nm
    xyz_sig_px (N, 3) / xyz_sig_nm (N, 3), phot (N,), phot_sig (N,) photons, bg (N,) photons/px
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.sigma_munet import BG_CH, MU_CH, N_CHANNELS, P_CH, SIGMA_CH

# DECODE's defaults (smlm.md §5, §12): a pixel needs p > 0.5 to seed a detection, and a non-maximum with
# p > 0.6 is confident enough to be a second emitter next to the maximum rather than part of it.
RAW_TH = 0.5
SPLIT_TH = 0.6
# DECODE's fitting-notebook filter: a predicted std above these is a poor localisation (overlap, dim emitter),
# worth dropping when precision matters more than recall.
MAX_SIGMA_XY_NM = 40.0
MAX_SIGMA_Z_NM = 80.0

DETECTION_KEYS = ("frame_ix", "prob", "prob_raw", "pixel", "param_out", "sigma_out", "xyz_px", "xyz_nm",
                  "xyz_sig_px", "xyz_sig_nm", "phot", "phot_sig", "bg")


def _as_output(output) -> torch.Tensor:
    out = torch.as_tensor(output).detach()
    if out.ndim != 4 or out.shape[1] != N_CHANNELS:
        raise ValueError(f"model output must be (B, {N_CHANNELS}, H, W), got {tuple(out.shape)}")
    return out.to(torch.promote_types(out.dtype, torch.float32))


def spatial_integration(p, raw_th: float = RAW_TH, split_th: float = SPLIT_TH) -> torch.Tensor:
    """p (B, H, W) detection probabilities -> integrated p_new (B, H, W); formulas in the module docstring.
    The sums are clamped to 1 (DECODE's norm_sum): p_new is still a probability."""
    p = torch.as_tensor(p).detach()
    if p.ndim != 3:
        raise ValueError(f"p must be (B, H, W), got {tuple(p.shape)}")
    p = p.to(torch.promote_types(p.dtype, torch.float32))[:, None]             # (B, 1, H, W)
    above = p > raw_th
    p_clip = p * above
    mask1 = above & (p == F.max_pool2d(p_clip, 3, stride=1, padding=1))
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=p.dtype, device=p.device)
    conv = F.conv2d(p, cross[None, None], padding=1)
    mask2 = (p * ~mask1) > split_th
    p_new = ((mask1 | mask2) * conv).clamp(0.0, 1.0)
    return p_new[:, 0]


def detections_from_output(output, raw_th: float = RAW_TH, split_th: float = SPLIT_TH, *,
                           px_size_nm: tuple[float, float], z_max_nm: float, phot_max: float, bg_max: float,
                           max_sigma_xy_nm: float | None = None, max_sigma_z_nm: float | None = None,
                           frame_ix0: int = 0) -> dict[str, np.ndarray]:
    """(B, 10, H, W) activated maps -> detections dict (keys and units in the module docstring).

    SpatialIntegration with raw_th / split_th, look-up of p_new >= raw_th, conversion to photons and nm with
    the simulation's scales (px_size_nm (x, y), z_max_nm, phot_max, bg_max: SimConfig.px_size_nm, z_max,
    phot_max, bg_max), then the sigma filter if max_sigma_xy_nm or max_sigma_z_nm is set (the notebook uses
    MAX_SIGMA_XY_NM and MAX_SIGMA_Z_NM).
    """
    out = _as_output(output)
    p_new = spatial_integration(out[:, P_CH], raw_th, split_th)
    b_ix, i_ix, j_ix = torch.nonzero(p_new >= raw_th, as_tuple=True)         # row-major within a frame
    mu = out[b_ix, MU_CH.start:MU_CH.stop, i_ix, j_ix]                        # (N, 4)
    sigma = out[b_ix, SIGMA_CH.start:SIGMA_CH.stop, i_ix, j_ix]               # (N, 4)
    param = torch.stack([mu[:, 0], j_ix.to(mu.dtype) + mu[:, 1], i_ix.to(mu.dtype) + mu[:, 2], mu[:, 3]], dim=1)

    px = torch.tensor([px_size_nm[0], px_size_nm[1]], dtype=mu.dtype, device=mu.device)
    xyz_px = torch.cat([param[:, 1:3], param[:, 3:] * z_max_nm], dim=1)
    xyz_sig_px = torch.cat([sigma[:, 1:3], sigma[:, 3:] * z_max_nm], dim=1)
    det = {
        "frame_ix": (b_ix + frame_ix0).to(torch.int64),
        "prob": p_new[b_ix, i_ix, j_ix],
        "prob_raw": out[b_ix, P_CH, i_ix, j_ix],
        "pixel": torch.stack([i_ix, j_ix], dim=1).to(torch.int64),
        "param_out": param,
        "sigma_out": sigma,
        "xyz_px": xyz_px,
        "xyz_nm": torch.cat([xyz_px[:, :2] * px, xyz_px[:, 2:]], dim=1),
        "xyz_sig_px": xyz_sig_px,
        "xyz_sig_nm": torch.cat([xyz_sig_px[:, :2] * px, xyz_sig_px[:, 2:]], dim=1),
        "phot": mu[:, 0] * phot_max,
        "phot_sig": sigma[:, 0] * phot_max,
        "bg": out[b_ix, BG_CH, i_ix, j_ix] * bg_max,
    }
    det = {k: v.cpu().numpy() for k, v in det.items()}
    if max_sigma_xy_nm is not None or max_sigma_z_nm is not None:
        det = filter_by_sigma(det, max_sigma_xy_nm, max_sigma_z_nm)
    return det


def filter_by_sigma(det: dict[str, np.ndarray], max_sigma_xy_nm: float | None = MAX_SIGMA_XY_NM,
                    max_sigma_z_nm: float | None = MAX_SIGMA_Z_NM) -> dict[str, np.ndarray]:
    """Keep detections with sigma_x, sigma_y <= max_sigma_xy_nm and sigma_z <= max_sigma_z_nm (None: no limit)."""
    sig = det["xyz_sig_nm"]
    keep = np.ones(len(sig), dtype=bool)
    if max_sigma_xy_nm is not None:
        keep &= (sig[:, 0] <= max_sigma_xy_nm) & (sig[:, 1] <= max_sigma_xy_nm)
    if max_sigma_z_nm is not None:
        keep &= sig[:, 2] <= max_sigma_z_nm
    return {k: v[keep] for k, v in det.items()}
