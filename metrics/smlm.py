"""Single-molecule localisation: post-processing of network maps, matching, detection and error metrics,
efficiency, CRLB.

Metrics: numpy in, dict of floats out. Positions are in nm: x, y, z columns of (N, 3) arrays (a (N, 2) array is
read as z = 0), frames are integer indices. Converting px to nm (x_nm = x_px * px_size) is the caller's job.

Matching (smlm.md §6.1, DECODE's `GreedyHungarianMatching` defaults): per frame, a prediction and a
ground-truth emitter may pair when |d_lat| = sqrt(dx^2 + dy^2) <= dist_lat (250 nm), |dz| <= dist_ax
(500 nm) and, if set, sqrt(dx^2 + dy^2 + dz^2) <= dist_vol. Among the allowed pairs of a frame the cheapest
one (3D distance for match_dims=3, lateral for 2) is taken, its prediction and emitter are removed, and
this repeats until no allowed pair is left. That is the same as scanning all allowed pairs in increasing
cost and keeping those whose two ends are still free; ties go to the lower prediction index, then the
lower ground-truth index (first occurrence in a row-major (pred, gt) cost matrix). Frames never interact.
Unmatched predictions are FP, unmatched ground truth FN.

Metrics (smlm.md §6.2), fractions in [0, 1] (DECODE's convention), NaN when undefined:
    precision = TP / (TP + FP),  recall = TP / (TP + FN),  jaccard = TP / (TP + FP + FN)
    f1 = 2 TP / (2 TP + FP + FN)   (= 2PR / (P + R); 0 rather than NaN when TP = 0 but FP + FN > 0)
    over the TP pairs, d = prediction - ground truth in nm:
    rmse_lat = sqrt(mean(dx^2 + dy^2)),  rmse_ax = sqrt(mean(dz^2)),  rmse_vol = sqrt(mean(dx^2 + dy^2 + dz^2))
    mad_lat = mean(|dx| + |dy|),         mad_ax = mean(|dz|),         mad_vol = mean(|dx| + |dy| + |dz|)
    efficiency (SMLM 2016 challenge, Sage et al. 2019), JI = jaccard as a fraction, RMSE in nm:
        E = (100 - sqrt((100 (1 - JI))^2 + alpha^2 RMSE^2)) / 100,  alpha_lat = 1 nm^-1, alpha_ax = 0.5 nm^-1
        effcy_lat uses rmse_lat, effcy_ax rmse_ax, effcy_vol = (effcy_lat + effcy_ax) / 2; E may be negative.

Cramer-Rao lower bound (not in smlm.md, which only names CRLB variances as EmitterSet fields): for an
emitter with expected image mu_k(theta) on pixels k and independent Poisson counts, the Fisher information
is I_ij = sum_k (d mu_k / d theta_i)(d mu_k / d theta_j) / mu_k; an EMCCD at high gain doubles the count
variance (excess noise factor F^2 = 2), which divides I by 2 (Mortensen et al. 2010). CRLB_i = sqrt(inv(I)_ii).
The 2D PSF is DECODE's pixel-integrated Gaussian (smlm.md §1.3) with theta = (x px, y px, N photons,
b photons/px), N the total photons of the unbounded PSF, b the per-pixel background, all four estimated.
Pixel (row i, col j) of the ROI covers [j - 1/2, j + 1/2) x [i - 1/2, i + 1/2) px (centre (j, i)), as in
losses/smlm.py. In the no-background limit with a centred emitter this gives var_x = sigma_a^2 / N,
sigma_a^2 = sigma^2 + a^2 / 12 (a the pixel size), Mortensen's maximum-likelihood result (times F^2 for
an EMCCD). The lateral bound reported is sqrt(CRLB_x^2 + CRLB_y^2), the bound on sqrt(E[dx^2 + dy^2]), so
it compares with rmse_lat, which also sums both axes.

Post-processing of SigmaMUNet maps into detections (`detections_from_output`): DECODE's SpatialIntegration
+ look-up (smlm.md §5).

Input: the activated model output (B, 10, H, W), torch tensor or numpy array, channel layout and units of
`losses/smlm.py` (P_CH, MU_CH, SIGMA_CH, BG_CH): p; photons / phot_max, x offset px, y offset px,
z / z_max; their sigmas in the same units; bg / bg_max. Frame b of the batch gets frame index
frame_ix0 + b.

SpatialIntegration (DECODE's default post-processing), on the p map of each frame, thresholds raw_th and
split_th = 0.6:

    p_clip = p * [p > raw_th]
    mask1  = [p > raw_th] * [p == maxpool3x3(p_clip)]        local maxima above the threshold
    conv   = p convolved with [[0,1,0],[1,1,1],[0,1,0]]       centre + 4 neighbours, zero padding
    mask2  = [p * (1 - mask1) > split_th]                     a confident non-maximum: a second emitter
    p_new  = clamp(mask1 * conv + mask2 * conv, 0, 1)         ("norm_sum"; "sum" leaves out the clamp)

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
0 nm, as in DECODE's px -> nm conversion). Defaults are the reference simulation's scales: phot_max =
10000 + 8 * 3000 = 34000, z_max = 1.2 * 750 = 900 nm, bg_max = 1.2 * 150 = 180, px 100 x 100 nm.

Optional sigma filter (DECODE's fitting notebook): drop detections with sigma_x or sigma_y > 40 nm or
sigma_z > 80 nm; each limit may be None (not applied).

Detections are a dict of numpy arrays with one row each, ordered by frame then row-major pixel:
    frame_ix (N,) int64; prob (N,) integrated p_new; prob_raw (N,) p of the pixel itself
    param_out (N, 4)  (photons / phot_max, x px, y px, z / z_max): the target layout of losses/smlm.py
    sigma_out (N, 4)  the sigmas in the same units
    xyz_px (N, 3)     x px, y px, z nm (DECODE's EmitterSet convention: z is always nm)
    xyz_nm (N, 3)     x, y, z nm
    xyz_sig_px (N, 3) / xyz_sig_nm (N, 3), phot (N,), phot_sig (N,) photons, bg (N,) photons/px
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr

from losses.smlm import BG_CH, MU_CH, N_CHANNELS, P_CH, SIGMA_CH

DIST_LAT_NM = 250.0
DIST_AX_NM = 500.0
ALPHA_LAT = 1.0   # nm^-1
ALPHA_AX = 0.5    # nm^-1
EMCCD_EXCESS_NOISE = 2.0


def _as_xyz(xyz, name: str) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim == 1 and xyz.size == 0:
        xyz = xyz.reshape(0, 3)
    if xyz.ndim != 2 or xyz.shape[1] not in (2, 3):
        raise ValueError(f"{name} must be (N, 3) or (N, 2) positions in nm, got shape {xyz.shape}")
    if xyz.shape[1] == 2:
        xyz = np.concatenate([xyz, np.zeros((len(xyz), 1))], axis=1)
    return xyz


def _as_frames(frame, n: int, name: str) -> np.ndarray:
    frame = np.asarray(frame).reshape(-1)
    if frame.shape[0] != n:
        raise ValueError(f"{name} must have one frame index per emitter ({n}), got {frame.shape[0]}")
    return frame.astype(np.int64)


def match_emitters(pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat: float | None = DIST_LAT_NM,
                   dist_ax: float | None = DIST_AX_NM, dist_vol: float | None = None,
                   match_dims: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame greedy matching; returns (pred_idx, gt_idx), int arrays of the TP pairs.

    pred_xyz (N, 3) nm, pred_frame (N,), gt_xyz (M, 3) nm, gt_frame (M,). A threshold of None is not
    applied. Pairs come in the order they were accepted: by frame, then by increasing cost.
    TP = len(pred_idx), FP = N - TP, FN = M - TP.
    """
    if match_dims not in (2, 3):
        raise ValueError(f"match_dims must be 2 or 3, got {match_dims}")
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    pred_frame = _as_frames(pred_frame, len(pred_xyz), "pred_frame")
    gt_frame = _as_frames(gt_frame, len(gt_xyz), "gt_frame")
    # Stable sorts keep the original index order inside a frame, which the tie-breaking relies on.
    pred_order = np.argsort(pred_frame, kind="stable")
    gt_order = np.argsort(gt_frame, kind="stable")
    pred_sorted, gt_sorted = pred_frame[pred_order], gt_frame[gt_order]
    matched_pred, matched_gt = [], []
    for frame in np.intersect1d(pred_sorted, gt_sorted):
        p_idx = pred_order[np.searchsorted(pred_sorted, frame, "left"):np.searchsorted(pred_sorted, frame, "right")]
        g_idx = gt_order[np.searchsorted(gt_sorted, frame, "left"):np.searchsorted(gt_sorted, frame, "right")]
        diff = pred_xyz[p_idx, None, :] - gt_xyz[None, g_idx, :]            # (n_pred, n_gt, 3)
        d_lat = np.hypot(diff[..., 0], diff[..., 1])
        d_vol = np.sqrt(d_lat**2 + diff[..., 2] ** 2)
        allowed = np.ones(d_lat.shape, dtype=bool)
        if dist_lat is not None:
            allowed &= d_lat <= dist_lat
        if dist_ax is not None:
            allowed &= np.abs(diff[..., 2]) <= dist_ax
        if dist_vol is not None:
            allowed &= d_vol <= dist_vol
        rows, cols = np.nonzero(allowed)                                     # row-major order
        cost = (d_vol if match_dims == 3 else d_lat)[rows, cols]
        order = np.argsort(cost, kind="stable")
        pred_free = np.ones(len(p_idx), dtype=bool)
        gt_free = np.ones(len(g_idx), dtype=bool)
        for r, c in zip(rows[order], cols[order]):
            if pred_free[r] and gt_free[c]:
                pred_free[r] = gt_free[c] = False
                matched_pred.append(p_idx[r])
                matched_gt.append(g_idx[c])
    return np.asarray(matched_pred, dtype=np.int64), np.asarray(matched_gt, dtype=np.int64)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def detection_metrics(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, Jaccard index and F1 as fractions (formulas in the module docstring)."""
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "jaccard": _ratio(tp, tp + fp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def localisation_errors(pred_xyz, gt_xyz) -> dict[str, float]:
    """RMSE and MAD (lateral, axial, volumetric) in nm over matched pairs (N, 3); NaN when N = 0."""
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    if pred_xyz.shape != gt_xyz.shape:
        raise ValueError(f"matched pred_xyz and gt_xyz must have the same shape, "
                         f"got {pred_xyz.shape} vs {gt_xyz.shape}")
    if len(pred_xyz) == 0:
        return {k: float("nan") for k in ("rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "mad_ax", "mad_vol")}
    d = pred_xyz - gt_xyz
    sq_lat, sq_ax = (d[:, :2] ** 2).sum(1), d[:, 2] ** 2
    abs_lat, abs_ax = np.abs(d[:, :2]).sum(1), np.abs(d[:, 2])
    return {"rmse_lat": float(np.sqrt(sq_lat.mean())), "rmse_ax": float(np.sqrt(sq_ax.mean())),
            "rmse_vol": float(np.sqrt((sq_lat + sq_ax).mean())), "mad_lat": float(abs_lat.mean()),
            "mad_ax": float(abs_ax.mean()), "mad_vol": float((abs_lat + abs_ax).mean())}


def efficiency(jaccard: float, rmse_nm: float, alpha: float) -> float:
    """SMLM-challenge efficiency as a fraction: (100 - sqrt((100 (1 - JI))^2 + alpha^2 RMSE^2)) / 100."""
    return (100.0 - math.sqrt((100.0 * (1.0 - jaccard)) ** 2 + (alpha * rmse_nm) ** 2)) / 100.0


def rmse_over_crlb(rmse_lat_nm: float, crlb_lat_nm) -> float:
    """rmse_lat divided by the matching bound sqrt(mean(CRLB_lat^2)).

    crlb_lat_nm: one lateral bound (nm) or one per matched emitter, so emitters of different brightness
    pool the same way their squared errors do in rmse_lat. 1.0 means the physical limit; below 1 is only
    possible through noise in the estimate, bias towards the truth, or a mismatched PSF/camera model.
    """
    crlb = np.asarray(crlb_lat_nm, dtype=np.float64)
    if crlb.size == 0:
        return float("nan")
    return float(rmse_lat_nm / np.sqrt(np.mean(crlb**2)))


def smlm_metrics(pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat: float | None = DIST_LAT_NM,
                 dist_ax: float | None = DIST_AX_NM, dist_vol: float | None = None, match_dims: int = 3,
                 gt_crlb_lat_nm=None) -> dict[str, float]:
    """Match, then every metric of the module docstring; positions in nm.

    gt_crlb_lat_nm: optional lateral CRLB (nm) per ground-truth emitter (M,) or one value; adds
    "crlb_lat" (the RMS bound over the matched emitters) and "rmse_over_crlb".
    """
    pred_xyz, gt_xyz = _as_xyz(pred_xyz, "pred_xyz"), _as_xyz(gt_xyz, "gt_xyz")
    pred_idx, gt_idx = match_emitters(pred_xyz, pred_frame, gt_xyz, gt_frame, dist_lat, dist_ax, dist_vol,
                                      match_dims)
    tp = len(pred_idx)
    fp, fn = len(pred_xyz) - tp, len(gt_xyz) - tp
    out = {"tp": float(tp), "fp": float(fp), "fn": float(fn), **detection_metrics(tp, fp, fn)}
    out.update(localisation_errors(pred_xyz[pred_idx], gt_xyz[gt_idx]))
    out["effcy_lat"] = efficiency(out["jaccard"], out["rmse_lat"], ALPHA_LAT)
    out["effcy_ax"] = efficiency(out["jaccard"], out["rmse_ax"], ALPHA_AX)
    out["effcy_vol"] = (out["effcy_lat"] + out["effcy_ax"]) / 2
    if gt_crlb_lat_nm is not None:
        crlb = np.broadcast_to(np.asarray(gt_crlb_lat_nm, dtype=np.float64), (len(gt_xyz),))[gt_idx]
        out["crlb_lat"] = float(np.sqrt(np.mean(crlb**2))) if tp else float("nan")
        out["rmse_over_crlb"] = rmse_over_crlb(out["rmse_lat"], crlb)
    return out


def _pixel_mass(centres: np.ndarray, pos, sigma) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of a 1D Gaussian (mean pos, std sigma, px) on each pixel [c - 1/2, c + 1/2) and its d/d pos.

    pos, sigma broadcast to shape S; returns (S + (len(centres),)) arrays.
    """
    pos, sigma = np.asarray(pos, dtype=np.float64)[..., None], np.asarray(sigma, dtype=np.float64)[..., None]
    lo, hi = (centres - 0.5 - pos) / sigma, (centres + 0.5 - pos) / sigma
    # Upper-tail difference where both edges are right of the mean: avoids 1 - 1 cancellation in the tails.
    mass = np.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    pdf = lambda t: np.exp(-0.5 * t**2) / math.sqrt(2 * math.pi)  # noqa: E731
    return mass, -(pdf(hi) - pdf(lo)) / sigma


def default_roi_px(sigma_px) -> int:
    """Odd ROI side (px) holding +-6 sigma, so the no-background Fisher information lost in the tails is < 1e-7."""
    return 2 * int(math.ceil(6 * float(np.max(sigma_px)))) + 1


def gaussian_psf_image(x_px, y_px, n_photons, bg, sigma_px, roi_px: int) -> np.ndarray:
    """Expected photons per pixel (..., roi, roi) of DECODE's pixel-integrated Gaussian (smlm.md §1.3) plus bg.

    x_px, y_px in ROI coordinates (pixel centres at 0 .. roi-1, x along columns); sigma_px a scalar or an
    (sigma_x, sigma_y) pair (astigmatism); n_photons total photons; bg photons per pixel. Inputs broadcast.
    """
    sx, sy = (sigma_px, sigma_px) if np.ndim(sigma_px) == 0 else sigma_px
    centres = np.arange(roi_px, dtype=np.float64)
    ex, _ = _pixel_mass(centres, x_px, sx)
    ey, _ = _pixel_mass(centres, y_px, sy)
    n, b = np.asarray(n_photons, dtype=np.float64), np.asarray(bg, dtype=np.float64)
    return n[..., None, None] * ey[..., :, None] * ex[..., None, :] + b[..., None, None]


def astigmatic_sigma(z_nm, sigma0_px: float, foc_shift_nm: float = 250.0, rl_nm: float = 280.0):
    """(sigma_x, sigma_y) in px of DECODE's astigmatic Gaussian (smlm.md §1.3) at depth z_nm."""
    z = np.asarray(z_nm, dtype=np.float64)
    return (sigma0_px * np.sqrt(1 + ((z + foc_shift_nm) / rl_nm) ** 2),
            sigma0_px * np.sqrt(1 + ((z - foc_shift_nm) / rl_nm) ** 2))


def gaussian_2d_fisher(n_photons, bg, sigma_px: float, offset_px=(0.0, 0.0), roi_px: int | None = None,
                       excess_noise: float = 1.0) -> np.ndarray:
    """Fisher information (..., 4, 4) over (x px, y px, N photons, b photons/px), analytic derivatives.

    The emitter sits at the centre pixel of an odd roi_px ROI plus offset_px (x, y); n_photons and bg
    broadcast (one matrix per element); excess_noise is 1 for a Poisson (sCMOS/ideal) camera and 2 for
    an EMCCD at high gain.
    """
    roi = default_roi_px(sigma_px) if roi_px is None else int(roi_px)
    centres = np.arange(roi, dtype=np.float64)
    ex, dex = _pixel_mass(centres, (roi - 1) / 2 + offset_px[0], sigma_px)
    ey, dey = _pixel_mass(centres, (roi - 1) / 2 + offset_px[1], sigma_px)
    n = np.asarray(n_photons, dtype=np.float64)[..., None, None]
    b = np.asarray(bg, dtype=np.float64)[..., None, None]
    n, b = np.broadcast_arrays(n, b)
    psf = ey[:, None] * ex[None, :]                                          # (roi, roi), sums to ~1
    mu = n * psf + b
    if np.any(mu <= 0):
        raise ValueError("the expected image has pixels with mu <= 0; use bg > 0 "
                         "(a tiny bg gives the no-background limit)")
    jac = np.stack(np.broadcast_arrays(n * ey[:, None] * dex[None, :], n * dey[:, None] * ex[None, :],
                                       psf, np.ones_like(mu)), axis=-1)   # (..., roi, roi, 4)
    return np.einsum("...hwi,...hwj,...hw->...ij", jac, jac, 1.0 / mu) / excess_noise


def fisher_information(image_fn: Callable[[np.ndarray], np.ndarray], theta, steps=None,
                       excess_noise: float = 1.0) -> np.ndarray:
    """Fisher information (P, P) of any expected-image model by central finite differences.

    image_fn(theta) -> expected photons per pixel (any shape, all > 0) for parameters theta (P,), e.g. an
    astigmatic PSF with theta = (x px, y px, z nm, N, b). steps (P,): the difference step per parameter,
    in its own unit; default 1e-4 * max(|theta_i|, 1) (truncation error ~ step^2, round-off ~ 1e-16 / step).
    """
    theta = np.asarray(theta, dtype=np.float64)
    steps = 1e-4 * np.maximum(np.abs(theta), 1.0) if steps is None else np.asarray(steps, dtype=np.float64)
    mu = np.asarray(image_fn(theta), dtype=np.float64).reshape(-1)
    if np.any(mu <= 0):
        raise ValueError("image_fn(theta) must be positive in every pixel; add a background > 0")
    flat = lambda t: np.asarray(image_fn(t), dtype=np.float64).reshape(-1)  # noqa: E731
    jac = np.empty((mu.size, theta.size))
    for i, h in enumerate(steps):
        e = np.zeros_like(theta)
        e[i] = h
        jac[:, i] = (flat(theta + e) - flat(theta - e)) / (2 * h)
    return (jac / mu[:, None]).T @ jac / excess_noise


def emitter_crlb_nm(xyz_px, phot, bg, cfg, chunk: int = 512) -> np.ndarray:
    """CRLB (N, 3) in nm of x, y and z for each emitter of a simulation, z NaN for a 2D PSF.

    xyz_px (N, 3): x, y in px, z in nm; phot: the emitter's photons in its frame; bg: that frame's
    background (photons/px). cfg: a data.smlm.SimConfig (psf, sigma0_px, foc_shift_nm, rl_nm, px_size_nm,
    camera, qe). The parameters estimated are (x, y, z, N, b) for the astigmatic PSF, so the lateral bound
    includes the cost of not knowing z, and (x, y, N, b) for the 2D Gaussian; photons and background are
    detected electrons (x qe), the EMCCD excess-noise factor 2 divides the information. Each emitter sits
    alone at its sub-pixel offset in its own ROI of default_roi_px(max(sigma_x, sigma_y)) pixels (the ROI
    size matters through b: more pixels pin the background down better); frame edges and neighbours are
    ignored, so this is the single-emitter limit. A spline PSF has no closed form here: all NaN.
    """
    xyz = np.asarray(xyz_px, dtype=np.float64).reshape(-1, 3)
    n_em = len(xyz)
    out = np.full((n_em, 3), np.nan)
    if cfg.psf not in ("gaussian", "astigmatic") or n_em == 0:
        return out
    astig = cfg.psf == "astigmatic"
    excess = EMCCD_EXCESS_NOISE if cfg.camera == "emccd" else 1.0
    n_all = np.broadcast_to(np.asarray(phot, dtype=np.float64), (n_em,)) * cfg.qe
    b_all = np.maximum(np.broadcast_to(np.asarray(bg, dtype=np.float64), (n_em,)) * cfg.qe, 1e-3)
    dz = 1e-2  # nm, central-difference step for d mu / d z

    def sigmas(z):
        if astig:
            return astigmatic_sigma(z, cfg.sigma0_px, cfg.foc_shift_nm, cfg.rl_nm)
        return np.full_like(z, cfg.sigma0_px), np.full_like(z, cfg.sigma0_px)

    for lo in range(0, n_em, chunk):
        sl = slice(lo, lo + chunk)
        z, n, b = xyz[sl, 2], n_all[sl, None, None], b_all[sl, None, None]
        sx, sy = sigmas(z)
        roi = default_roi_px(max(sx.max(), sy.max()))
        centres = np.arange(roi, dtype=np.float64)
        # Pixels outside an emitter's own ROI (same centre, smaller side) carry no weight.
        own_half = np.array([default_roi_px(max(a, c)) // 2 for a, c in zip(sx, sy)])[:, None]
        inside = np.abs(centres - (roi - 1) / 2) <= own_half                       # (n, roi)
        weight = (inside[:, :, None] & inside[:, None, :]).astype(np.float64)          # (n, roi, roi)
        pos = (roi - 1) / 2 + xyz[sl, :2] - np.round(xyz[sl, :2])
        ex, dex = _pixel_mass(centres, pos[:, 0], sx)
        ey, dey = _pixel_mass(centres, pos[:, 1], sy)
        psf = ey[:, :, None] * ex[:, None, :]                                   # (n, roi, roi)
        mu = n * psf + b
        jac = [n * ey[:, :, None] * dex[:, None, :], n * dey[:, :, None] * ex[:, None, :]]
        if astig:
            (sxp, syp), (sxm, sym) = sigmas(z + dz), sigmas(z - dz)
            psf_p = _pixel_mass(centres, pos[:, 1], syp)[0][:, :, None] * _pixel_mass(centres, pos[:, 0], sxp)[0][:, None, :]
            psf_m = _pixel_mass(centres, pos[:, 1], sym)[0][:, :, None] * _pixel_mass(centres, pos[:, 0], sxm)[0][:, None, :]
            jac.append(n * (psf_p - psf_m) / (2 * dz))
        jac += [psf, np.ones_like(mu)]
        jac = np.stack(jac, axis=-1)                                            # (n, roi, roi, P)
        crlb = crlb_from_fisher(np.einsum("nhwi,nhwj,nhw->nij", jac, jac, weight / mu) / excess)
        out[sl, 0] = crlb[:, 0] * cfg.px_size_nm[0]
        out[sl, 1] = crlb[:, 1] * cfg.px_size_nm[1]
        if astig:
            out[sl, 2] = crlb[:, 2]
    return out


def crlb_from_fisher(fisher: np.ndarray) -> np.ndarray:
    """sqrt(diag(inv(I))) for (..., P, P) Fisher matrices, each parameter in its own unit.

    Jacobi-scaled before inverting because the entries span many decades (photons vs px).
    """
    fisher = np.asarray(fisher, dtype=np.float64)
    d = 1.0 / np.sqrt(np.diagonal(fisher, axis1=-2, axis2=-1))
    scaled = fisher * d[..., :, None] * d[..., None, :]
    return np.sqrt(np.diagonal(np.linalg.inv(scaled), axis1=-2, axis2=-1)) * d


def gaussian_2d_crlb(n_photons, bg, sigma_px: float, px_size_nm: float = 100.0, offset_px=(0.0, 0.0),
                     roi_px: int | None = None, excess_noise: float = 1.0) -> dict:
    """CRLB of the 2D pixel-integrated Gaussian with (x, y, N, b) all estimated.

    n_photons (photons) and bg (photons/px) broadcast; sigma_px the PSF std in px; px_size_nm converts x,
    y to nm. Returns "x_nm", "y_nm", "lat_nm" = sqrt(x_nm^2 + y_nm^2) (compare with rmse_lat),
    "photons" and "bg" (photons/px); floats for scalar inputs, arrays otherwise.
    """
    crlb = crlb_from_fisher(gaussian_2d_fisher(n_photons, bg, sigma_px, offset_px, roi_px, excess_noise))
    x_nm, y_nm = crlb[..., 0] * px_size_nm, crlb[..., 1] * px_size_nm
    out = {"x_nm": x_nm, "y_nm": y_nm, "lat_nm": np.hypot(x_nm, y_nm), "photons": crlb[..., 2], "bg": crlb[..., 3]}
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


# Post-processing: model maps -> detections

RAW_TH = 0.5
SPLIT_TH = 0.6
PHOT_MAX = 34_000.0   # photons
Z_MAX_NM = 900.0
BG_MAX = 180.0        # photons / px
PX_SIZE_NM = (100.0, 100.0)   # (x, y)
MAX_SIGMA_XY_NM = 40.0
MAX_SIGMA_Z_NM = 80.0
AGGREGATIONS = ("norm_sum", "sum")

DETECTION_KEYS = ("frame_ix", "prob", "prob_raw", "param_out", "sigma_out", "xyz_px", "xyz_nm", "xyz_sig_px",
                  "xyz_sig_nm", "phot", "phot_sig", "bg")


def _as_output(output) -> torch.Tensor:
    out = torch.as_tensor(output).detach()
    if out.ndim != 4 or out.shape[1] != N_CHANNELS:
        raise ValueError(f"model output must be (B, {N_CHANNELS}, H, W), got {tuple(out.shape)}")
    return out.to(torch.promote_types(out.dtype, torch.float32))


def spatial_integration(p, raw_th: float = RAW_TH, split_th: float = SPLIT_TH,
                        aggregation: str = "norm_sum") -> torch.Tensor:
    """p (B, H, W) detection probabilities -> integrated p_new (B, H, W); formulas in the module docstring."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
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
    p_new = (mask1 | mask2) * conv
    if aggregation == "norm_sum":
        p_new = p_new.clamp(0.0, 1.0)
    return p_new[:, 0]


def detections_from_output(output, raw_th: float = RAW_TH, split_th: float = SPLIT_TH, *,
                           aggregation: str = "norm_sum", px_size_nm: tuple[float, float] = PX_SIZE_NM,
                           z_max_nm: float = Z_MAX_NM, phot_max: float = PHOT_MAX, bg_max: float = BG_MAX,
                           max_sigma_xy_nm: float | None = None, max_sigma_z_nm: float | None = None,
                           frame_ix0: int = 0) -> dict[str, np.ndarray]:
    """(B, 10, H, W) activated maps -> detections dict (keys and units in the module docstring).

    SpatialIntegration with raw_th / split_th, look-up of p_new >= raw_th, conversion to photons and nm,
    then the sigma filter if max_sigma_xy_nm or max_sigma_z_nm is set (the notebook uses 40 and 80 nm).
    """
    out = _as_output(output)
    p_new = spatial_integration(out[:, P_CH], raw_th, split_th, aggregation)
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
