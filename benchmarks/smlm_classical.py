"""Classical peer of train_smlm.py: detection plus a per-ROI Poisson maximum-likelihood Gaussian fit, in torch.

Written from the maths (smlm.md §1.3 PSF, Smith et al. Nat Methods 2010 for the MLE, Laurence & Chromy 2010
for Levenberg-Marquardt on a Poisson likelihood); no code from DECODE, SMAP or ThunderSTORM. Every step is
vectorised over all frames or all candidate ROIs at once.

Units and conventions are those of data/smlm: frames (T, H, W) in photons; pixel (row i, col j) has its
centre at (x, y) = (j, i) px; z in nm.

Camera model of the fit
    The Poisson likelihood is right for a 'perfect' camera. An EMCCD at high gain doubles the variance of the
    photon counts (excess noise factor F^2 = 2), so the frames are divided by F^2 = 2 before fitting: d / 2
    then has variance ~ mean, as a Poisson count would, and the fitted photons and background are multiplied
    by 2 again (the usual trick; it weights the pixels correctly, and the positions are unchanged by the
    scaling). An sCMOS camera's Gaussian read noise r (e-^2 per pixel: read_sigma^2 or the per-pixel map,
    plus the ADU rounding) is handled by adding v = r / qe photons to both data and model (Huang et al. Nat
    Methods 2013): in photoelectrons, qe d + r has mean qe mu + r and variance qe mu + r, a Poisson-like
    count, and a Poisson likelihood is maximised at the same parameters when data and model are both scaled
    by 1 / qe (it only multiplies the log-likelihood by a constant). The fit in photons is therefore the fit
    in photoelectrons, for any qe.
    Data are clamped at 0 inside the likelihood; read noise makes a few pixels slightly negative.

Detection
    1. background: the per-frame median b (photons/px), right for the uniform per-frame background of the
       simulation (smlm.md §1.4) and robust while emitters cover well under half of the frame;
    2. a matched filter: the background-subtracted frame correlated with a Gaussian g of the in-focus PSF
       width (sigma0; for the astigmatic PSF its width at z = 0, sigma0 sqrt(1 + (foc_shift / rl)^2)),
       divided by the standard deviation of that correlation under background-only noise,
       sqrt(sum g^2 F^2 (b + v) / qe), v = r / qe the sCMOS read-noise offset (0 otherwise): the variance of
       a background pixel in photons (qe b + r photoelectrons, times F^2, over qe^2). The map is therefore in units of
       background-noise standard deviations, also at the frame edge, where only g's part inside the frame
       counts in both numerator and denominator;
    3. candidates: local maxima of that map in a (2 nms_radius + 1)^2 neighbourhood (3 x 3 by default) above
       `threshold` = k (default 5) noise standard deviations. On a 64 x 64 px, 256-frame background-only
       EMCCD movie (bg 90-150) k = 3, 4, 5 give ~900, ~40 and 0 candidates; at bg 120 a 10,000-photon
       emitter scores ~130 in focus and ~55 at z = 700 nm, a 500-photon one ~6.5 and ~2.7.
ROIs
    (2 roi_radius + 1)^2 px around each candidate; roi_radius defaults to max(3, ceil(2.5 sigma_det)), i.e. 3
    (7 x 7) for the 2D PSF with sigma0 = 1 px and 4 (9 x 9) for the default astigmatic PSF. A candidate
    closer than roi_radius to the frame edge keeps a full ROI shifted inwards (the emitter is then off-centre
    in its ROI, which the fit does not mind), so no candidate is skipped and nothing is padded; frames must
    be at least 2 roi_radius + 1 px on each side.
Model and fit (PsfModel and mle_fit live in models/smlm_mle.py, shared with fit_smlm.py --refine)
    mu_k = N Ex_j(x, s_x) Ey_i(y, s_y) + b, the simulator's pixel-integrated (erf) Gaussian and width curves
    (data.smlm.pixel_gaussian and psf_sigmas, which also give the derivatives of the Jacobian), with
    parameters (x, y, N, b) for the 2D Gaussian PSF (s_x = s_y = sigma0, known from the calibration) and
    (x, y, z, N, b) for the astigmatic PSF, whose s_x(z), s_y(z) are the calibration curves
    sigma0 sqrt(1 + ((z +- foc_shift) / rl)^2): z is fitted directly by maximum likelihood with the
    calibration, not looked up afterwards from free (s_x, s_y). The Poisson negative log-likelihood
    (as the deviance sum mu - d + d log(d / mu), which float32 resolves to the last iterations) is minimised
    by Levenberg-Marquardt with Fisher scoring: the curvature is the expected information
    I = J^T diag(1/mu) J (positive semi-definite even where d_k = 0, unlike the observed Hessian), damped by
    lambda diag(I); a step is kept only if it lowers the likelihood (lambda / 10, else lambda x 10); a fixed
    `iterations` (25) steps. Start: (x, y) the 3 x 3 centroid around the candidate, b the frame median,
    N the ROI's photons above b divided by the PSF mass inside the ROI, and for the astigmatic PSF z the best
    of a 16-point grid over z_range_nm (likelihood at the starting x, y, N, b), which keeps the fit out of
    the wrong branch of the calibration curve. Bounds, enforced by clamping every step: x, y at most 1 px
    beyond the ROI, z inside the calibrated z_range_nm (a box prior: without it dim, wide spots run off to
    large |z| with inflated N), N >= 1 photon, b >= 0.01. A parameter on a bound with the likelihood pulling
    it across is frozen for that step (projected Newton), so fits at the end of the z range converge.
Quality filter (a fit is dropped when any holds)
    not converged: the Newton decrement g^T I^-1 g over the free parameters exceeds 0.05, i.e. the estimate
    is farther than ~0.2 standard errors from a stationary point (after 25 iterations ~1 % of the ROIs at
    0.1 emitters/um^2 and ~4 % at 1.5/um^2, mostly fits on overlapping spots still moving); not finite;
    N <= 1 photon (nothing there);
    x or y more than 1.5 px from the candidate pixel, or outside the frame extent. Near the frame edge the
    matched filter sees only part of a wide PSF and places the candidate up to ~2 px inwards, so a candidate
    within roi_radius of an edge may move any distance towards that edge (up to the frame extent). Then
    duplicates: of two kept fits of one frame closer than `min_separation_px` (1 px) only the brighter stays
    (two candidates on one spot converge to the same emitter).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from data.smlm import SimConfig, excess_noise, pixel_gaussian, psf_sigmas
from models.smlm_mle import DECREMENT_TOL, PsfModel, crop_rois, mle_fit, poisson_deviance, read_var_photons

Z_GRID_POINTS = 16
MAX_SHIFT_PX = 1.5        # largest accepted distance (each of x, y) from the candidate pixel


def detection_sigma_px(cfg: SimConfig) -> float:
    """Width (px) of the matched smoothing filter: the PSF's in-focus width (astigmatic: at z = 0)."""
    if cfg.psf in ("gaussian", "astigmatic"):
        return float(psf_sigmas(torch.zeros(1, dtype=torch.float64), cfg)[0])
    raise ValueError(f"psf {cfg.psf!r}: the classical fitter knows only 'gaussian' and 'astigmatic'")


def default_roi_radius(cfg: SimConfig) -> int:
    """3 px (7 x 7 ROI) for sigma <= 1.2 px at focus; wider PSFs get ceil(2.5 sigma)."""
    return max(3, math.ceil(2.5 * detection_sigma_px(cfg)))


def gaussian_kernel(sigma_px: float) -> torch.Tensor:
    """(K, K) normalised Gaussian, K = 2 ceil(3 sigma) + 1."""
    half = math.ceil(3 * sigma_px)
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def snr_map(frames: torch.Tensor, cfg: SimConfig, read_var: torch.Tensor | None = None):
    """Matched-filter map (T, H, W) in background-noise standard deviations and the per-frame background (T,)
    photons/px (module docstring, detection steps 1-2)."""
    bg = frames.flatten(1).median(dim=1).values
    kernel = gaussian_kernel(detection_sigma_px(cfg)).to(frames)
    half = kernel.shape[-1] // 2
    # Zero-padded correlation with g over the sqrt of the variance correlated with g^2: stays in noise
    # standard deviations at the frame edge, where part of g falls outside.
    var = excess_noise(cfg) / cfg.qe * (bg[:, None, None] + (0.0 if read_var is None else read_var)
                                         ).expand_as(frames)
    signal = F.conv2d((frames - bg[:, None, None])[:, None], kernel[None, None], padding=half)
    noise = F.conv2d(var[:, None], kernel.square()[None, None], padding=half).clamp_min(1e-12).sqrt()
    return (signal / noise)[:, 0], bg


def detect(frames: torch.Tensor, cfg: SimConfig, threshold: float = 5.0, nms_radius: int = 1,
           read_var: torch.Tensor | None = None):
    """Candidates (module docstring): returns (t, row, col) int64 (M,) each and the per-frame background (T,)."""
    snr, bg = snr_map(frames, cfg, read_var)
    w = 2 * nms_radius + 1
    is_max = snr == F.max_pool2d(snr[:, None], w, stride=1, padding=nms_radius)[:, 0]
    t, row, col = torch.nonzero(is_max & (snr > threshold), as_tuple=True)
    return t, row, col, bg


def _near_candidate(pos, cand, n_px: int, radius: int):
    """pos (px) within MAX_SHIFT_PX of the candidate pixel and inside the frame extent [-0.5, n_px - 0.5]; a
    candidate within `radius` px of an edge may move further towards that edge (module docstring)."""
    lo = torch.where(cand <= radius, torch.full_like(pos, -0.5), cand - MAX_SHIFT_PX)
    hi = torch.where(cand >= n_px - 1 - radius, torch.full_like(pos, n_px - 0.5), cand + MAX_SHIFT_PX)
    return (pos >= lo.clamp_min(-0.5)) & (pos <= hi.clamp_max(n_px - 0.5))


def _initial_theta(psf: PsfModel, data: torch.Tensor, offset: torch.Tensor, bg: torch.Tensor, cy, cx):
    """Starting parameters (module docstring); data (R, S, S) in fitted units, offset (R, S*S) its read-variance
    part, bg (R,), (cy, cx) the candidate pixel in ROI coordinates."""
    r_ix = torch.arange(len(data), device=data.device)
    above = (data - offset.view_as(data) - bg[:, None, None]).clamp_min(0)
    d = torch.arange(-1, 2, device=data.device)
    ys = (cy[:, None] + d).clamp(0, psf.size - 1)
    xs = (cx[:, None] + d).clamp(0, psf.size - 1)
    patch = above[r_ix[:, None, None], ys[:, :, None], xs[:, None, :]]            # (R, 3, 3)
    mass = patch.sum((1, 2)).clamp_min(1e-6)
    x0 = (patch.sum(1) * xs).sum(1) / mass
    y0 = (patch.sum(2) * ys).sum(1) / mass
    x0 = torch.where(patch.sum((1, 2)) > 0, x0, cx.to(data.dtype))
    y0 = torch.where(patch.sum((1, 2)) > 0, y0, cy.to(data.dtype))
    roi_photons = above.sum((1, 2)).clamp_min(1.0)
    if not psf.astig:
        theta = torch.stack([x0, y0, roi_photons, bg], dim=1)
        return _rescale_photons(psf, theta, roi_photons)
    z_grid = torch.linspace(*psf.z_lim, Z_GRID_POINTS, device=data.device)
    flat = data.flatten(1)
    best_nll, best_theta = None, None
    for z in z_grid:
        theta = torch.stack([x0, y0, torch.full_like(x0, float(z)), roi_photons, bg], dim=1)
        theta = _rescale_photons(psf, theta, roi_photons)
        nll = poisson_deviance(psf.model(theta, jacobian=False)[0] + offset, flat)
        if best_nll is None:
            best_nll, best_theta = nll, theta
        else:
            better = nll < best_nll
            best_nll = torch.where(better, nll, best_nll)
            best_theta = torch.where(better[:, None], theta, best_theta)
    return best_theta


def _rescale_photons(psf: PsfModel, theta, roi_photons):
    """N such that the model puts roi_photons inside the ROI (the PSF's tails fall outside)."""
    sx, sy, _, _ = psf.sigmas(theta)
    inside = pixel_gaussian(psf.size, theta[:, 0], sx).sum(1) * pixel_gaussian(psf.size, theta[:, 1], sy).sum(1)
    theta = theta.clone()
    theta[:, psf.n_ix] = roi_photons / inside.clamp_min(1e-3)
    return theta


def _drop_duplicates(frame_ix: torch.Tensor, xy: torch.Tensor, phot: torch.Tensor, min_sep: float) -> torch.Tensor:
    """Keep mask (M,): of fits in one frame closer than min_sep px only the brightest survives. Pairwise per
    frame on a (frames, K, K) padded grid, K the most fits in a frame."""
    m = len(frame_ix)
    if m == 0 or min_sep <= 0:
        return torch.ones(m, dtype=torch.bool, device=frame_ix.device)
    order = torch.argsort(-phot, stable=True)                                     # brightest first
    order = order[torch.argsort(frame_ix[order], stable=True)]                    # grouped by frame
    f = frame_ix[order]
    _, counts = torch.unique_consecutive(f, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(m, device=f.device) - torch.repeat_interleave(starts, counts)
    group = torch.repeat_interleave(torch.arange(len(counts), device=f.device), counts)
    k = int(counts.max())
    pos = torch.full((len(counts), k, 2), 1e9, device=f.device, dtype=xy.dtype)  # padding: far away
    pos[group, slot] = xy[order]
    dist = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")    # (G, K, K)
    brighter = torch.arange(k, device=f.device)[None, :] < torch.arange(k, device=f.device)[:, None]
    # Suppression by an already-suppressed brighter fit still suppresses: good enough at 1 px, and the
    # fixed point of the greedy rule would need a loop.
    suppressed = ((dist < min_sep) & brighter[None]).any(2)                       # (G, K)
    keep_sorted = ~suppressed[group, slot]
    keep = torch.empty(m, dtype=torch.bool, device=f.device)
    keep[order] = keep_sorted
    return keep


@torch.no_grad()
def fit_movie(frames_photons: torch.Tensor, cfg: SimConfig, threshold: float = 5.0, roi_radius: int | None = None,
              nms_radius: int = 1, iterations: int = 25, min_separation_px: float = 1.0, batch_rois: int = 8192,
              device: str | torch.device | None = None) -> dict:
    """Localise every emitter of a movie (module docstring).

    frames_photons (T, H, W) photons; cfg the simulation's SimConfig (psf, sigma0_px, foc_shift_nm, rl_nm,
    z_range_nm, px_size_nm, camera, qe, read noise). threshold: k of the detection rule, in standard
    deviations of the smoothed background noise. roi_radius: ROI half-width in px (default
    `default_roi_radius(cfg)`, 3 for sigma0 = 1). Returns numpy arrays: frame_ix (M,) int64, xyz_px (M, 3)
    (x px, y px, z nm; z = 0 for the 2D PSF), xyz_nm (M, 3), phot (M,) photons, bg (M,) photons/px, nll (M,)
    the Poisson deviance of the fit (in fitted units, frames / F^2), and n_candidates (int), the number of
    candidates before the quality filter. Runs on `device` (default: the frames' device).
    """
    frames_photons = torch.as_tensor(frames_photons)
    if frames_photons.ndim != 3:
        raise ValueError(f"frames must be (T, H, W), got shape {tuple(frames_photons.shape)}")
    device = torch.device(device) if device is not None else frames_photons.device
    frames = frames_photons.to(device=device, dtype=torch.float32)
    radius = default_roi_radius(cfg) if roi_radius is None else int(roi_radius)
    size = 2 * radius + 1
    h, w = frames.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"frames of {h}x{w} px are smaller than the {size}x{size} px ROI; lower roi_radius")
    psf = PsfModel(cfg, size)
    excess = excess_noise(cfg)
    read_var = read_var_photons(cfg, (h, w), device)
    t, row, col, frame_bg = detect(frames, cfg, threshold, nms_radius, read_var)
    n_cand = len(t)
    # Fitted units: photons / F^2 (data and the read-variance offset, module docstring).
    fit_img = (frames / excess + read_var / excess).clamp_min(0)
    offset_img = (read_var / excess).expand_as(frames)
    parts = []
    for s in range(0, n_cand, batch_rois):
        sl = slice(s, s + batch_rois)
        ti, ri, ci = t[sl], row[sl], col[sl]
        data, oy, ox = crop_rois(fit_img, ti, ri, ci, radius)
        offset = crop_rois(offset_img, ti, ri, ci, radius)[0].flatten(1)
        theta0 = _initial_theta(psf, data, offset, frame_bg[ti] / excess, ri - oy, ci - ox)
        theta, nll, decrement, _ = mle_fit(psf, data.flatten(1), offset, theta0, iterations)
        x = theta[:, 0] + ox
        y = theta[:, 1] + oy
        z = theta[:, 2] if psf.astig else torch.zeros_like(x)
        n, b = theta[:, psf.n_ix], theta[:, psf.b_ix]
        ok = (torch.isfinite(theta).all(1) & (decrement < DECREMENT_TOL) & (n > 1.0)
              & _near_candidate(x, ci, w, radius) & _near_candidate(y, ri, h, radius))
        parts.append((ti[ok], torch.stack([x, y, z], 1)[ok], n[ok] * excess, b[ok] * excess, nll[ok].float()))
    if parts:
        frame_ix, xyz, phot, bg, nll = (torch.cat(p) for p in zip(*parts))
    else:
        frame_ix, xyz = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3)
        phot = bg = nll = torch.zeros(0)
    keep = _drop_duplicates(frame_ix, xyz[:, :2], phot, min_separation_px)
    frame_ix, xyz, phot, bg, nll = frame_ix[keep], xyz[keep], phot[keep], bg[keep], nll[keep]
    scale = xyz.new_tensor([cfg.px_size_nm[0], cfg.px_size_nm[1], 1.0])
    return {"frame_ix": frame_ix.cpu().numpy().astype(np.int64), "xyz_px": xyz.cpu().numpy(),
            "xyz_nm": (xyz * scale).cpu().numpy(), "phot": phot.cpu().numpy(), "bg": bg.cpu().numpy(),
            "nll": nll.cpu().numpy(), "n_candidates": n_cand}
