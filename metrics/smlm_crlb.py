"""Cramer-Rao lower bound of single-emitter localisation (not in smlm.md, which only names CRLB variances as
EmitterSet fields).

For an emitter with expected image mu_k(theta) on pixels k and independent Poisson counts, the Fisher
information is I_ij = sum_k (d mu_k / d theta_i)(d mu_k / d theta_j) / mu_k; an EMCCD at high gain doubles the
count variance (excess noise factor F^2 = 2), which divides I by 2 (Mortensen et al. 2010); an sCMOS pixel's read
noise variance r adds to its count variance, mu_k -> mu_k + r_k (Huang et al. 2013). CRLB_i =
sqrt(inv(I)_ii). The PSF is the simulator's pixel-integrated Gaussian (data.smlm.pixel_gaussian, smlm.md §1.3)
with theta = (x px, y px, [z nm,] N photons, b photons/px), N the total photons of the unbounded PSF, b the
per-pixel background, all estimated. Pixel (row i, col j) of the ROI covers [j - 1/2, j + 1/2) x
[i - 1/2, i + 1/2) px (centre (j, i)), as in losses/smlm.py. In the no-background limit with a centred emitter
this gives var_x = sigma_a^2 / N, sigma_a^2 = sigma^2 + a^2 / 12 (a the pixel size), Mortensen's
maximum-likelihood result (times F^2 for an EMCCD). The lateral bound sqrt(CRLB_x^2 + CRLB_y^2) bounds
sqrt(E[dx^2 + dy^2]), so it compares with metrics.smlm's rmse_lat, which also sums both axes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from data.smlm import SimConfig, counted_qe, excess_noise, is_target, pixel_gaussian, psf_sigmas, read_noise_variance


def default_roi_px(sigma_px) -> int:
    """Odd ROI side (px) holding +-6 sigma, so the no-background Fisher information lost in the tails is < 1e-7."""
    return 2 * int(math.ceil(6 * float(np.max(sigma_px)))) + 1


def _axis(roi: int, pos: np.ndarray, sigma: np.ndarray):
    """`pixel_gaussian` with derivatives on float64 (n,) arrays: fraction, d/d pos, d/d sigma, each (n, roi)."""
    pos, sigma = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for v in (pos, sigma))
    return tuple(v.numpy() for v in pixel_gaussian(roi, pos, sigma, derivatives=True))


def emitter_crlb_nm(xyz_px, phot, bg, cfg: SimConfig, chunk: int = 512, read_var=None) -> np.ndarray:
    """CRLB (N, 3) in nm of x, y and z for each emitter of a simulation, z NaN for a 2D PSF.

    xyz_px (N, 3): x, y in px, z in nm; phot: the emitter's photons in its frame; bg: that frame's
    background (photons/px). cfg: the simulation's SimConfig (psf, sigma0_px, foc_shift_nm, rl_nm, px_size_nm,
    camera, qe). The parameters estimated are (x, y, z, N, b) for the astigmatic PSF, so the lateral bound
    includes the cost of not knowing z, and (x, y, N, b) for the 2D Gaussian; photons and background are
    detected electrons (x qe), the EMCCD excess-noise factor 2 divides the information. Each emitter sits
    alone at its sub-pixel offset in its own ROI of default_roi_px(max(sigma_x, sigma_y)) pixels (the ROI
    size matters through b: more pixels pin the background down better), cut at the edges of the frame
    (cfg.img_size; x, y px in the frame's pixel convention): an emitter near the edge has a larger bound,
    because part of its spot is never recorded. Neighbours are ignored, so this is the single-emitter limit.
    An sCMOS's read noise enters as the Poisson-equivalent model of Huang et al. 2013 (each pixel's
    information d mu^2 / (mu + r), r its read-noise variance in e-^2): read_var, a scalar or an (H, W) map
    over the frame, defaults to `data.smlm.read_noise_variance(cfg)` (0 for the other cameras).
    A spline PSF has no closed form here: all NaN.
    """
    xyz = np.asarray(xyz_px, dtype=np.float64).reshape(-1, 3)
    n_em = len(xyz)
    out = np.full((n_em, 3), np.nan)
    if cfg.psf not in ("gaussian", "astigmatic") or n_em == 0:
        return out
    astig = cfg.psf == "astigmatic"
    excess = excess_noise(cfg)
    qe = counted_qe(cfg)
    n_all = np.broadcast_to(np.asarray(phot, dtype=np.float64), (n_em,)) * qe
    # A floor of 1e-3 photons/px keeps mu > 0 (the information divides by it) for a frame without background.
    b_all = np.maximum(np.broadcast_to(np.asarray(bg, dtype=np.float64), (n_em,)) * qe, 1e-3)
    read_var = np.asarray(read_noise_variance(cfg) if read_var is None else read_var, dtype=np.float64)
    for lo in range(0, n_em, chunk):
        sl = slice(lo, lo + chunk)
        n, b = n_all[sl, None, None], b_all[sl, None, None]
        sx, sy, dsx, dsy = (s.numpy() for s in psf_sigmas(torch.from_numpy(xyz[sl, 2].copy()), cfg, with_dz=True))
        roi = default_roi_px(max(sx.max(), sy.max()))
        centres = np.arange(roi, dtype=np.float64)
        # Pixels outside an emitter's own ROI (same centre, smaller side) carry no weight, nor do pixels beyond
        # the frame's edge: the camera never records that part of the spot.
        own_half = np.array([default_roi_px(max(a, c)) // 2 for a, c in zip(sx, sy)])[:, None]
        inside = np.abs(centres - (roi - 1) / 2) <= own_half                       # (n, roi)
        frame_col = np.round(xyz[sl, 0])[:, None] - (roi - 1) // 2 + centres        # (n, roi) frame column
        frame_row = np.round(xyz[sl, 1])[:, None] - (roi - 1) // 2 + centres
        in_x = inside & (frame_col >= 0) & (frame_col <= cfg.img_size[1] - 1)
        in_y = inside & (frame_row >= 0) & (frame_row <= cfg.img_size[0] - 1)
        weight = (in_y[:, :, None] & in_x[:, None, :]).astype(np.float64)          # (n, roi, roi)
        pos = (roi - 1) / 2 + xyz[sl, :2] - np.round(xyz[sl, :2])
        ex, dex, dex_s = _axis(roi, pos[:, 0], sx)
        ey, dey, dey_s = _axis(roi, pos[:, 1], sy)
        psf = ey[:, :, None] * ex[:, None, :]                                   # (n, roi, roi)
        mu = n * psf + b
        jac = [n * ey[:, :, None] * dex[:, None, :], n * dey[:, :, None] * ex[:, None, :]]
        if astig:
            # z moves the image only through the two widths: chain rule through sigma_x(z), sigma_y(z).
            jac.append(n * (ey[:, :, None] * (dex_s * dsx[:, None])[:, None, :]
                            + (dey_s * dsy[:, None])[:, :, None] * ex[:, None, :]))
        jac += [psf, np.ones_like(mu)]
        jac = np.stack(jac, axis=-1)                                            # (n, roi, roi, P)
        if read_var.ndim == 2:  # each ROI pixel's own read noise; pixels outside the frame have weight 0
            r = read_var[frame_row.clip(0, cfg.img_size[0] - 1).astype(np.int64)[:, :, None],
                         frame_col.clip(0, cfg.img_size[1] - 1).astype(np.int64)[:, None, :]]
        else:
            r = read_var
        crlb = crlb_from_fisher(np.einsum("nhwi,nhwj,nhw->nij", jac, jac, weight / (excess * mu + r)))
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



def ground_truth(movie, cfg: SimConfig) -> dict:
    """The targets of a simulated movie (``data.smlm.is_target``, the emitters the loss trains on) as numpy, with
    their bound: frame_ix, xyz_px (x px, y px, z nm), xyz_nm, phot, bg (photons/px at the emitter's pixel),
    crlb_nm (``emitter_crlb_nm``: x, y, z), crlb_lat_nm (its lateral part) and row (each target's index in
    movie.emitters). Validation and the quality benchmark score against this."""
    keep = is_target(movie.emitters, cfg)
    e = movie.emitters.subset(keep)
    h, w = cfg.img_size
    row, col = e.xyz[:, 1].round().long().clamp(0, h - 1), e.xyz[:, 0].round().long().clamp(0, w - 1)
    gt = {"frame_ix": e.frame_ix.numpy(), "row": np.flatnonzero(keep.numpy()),
          "xyz_px": e.xyz.numpy().astype(np.float64),
          "phot": e.phot.numpy(), "bg": movie.bg[e.frame_ix, row, col].numpy()}
    gt["xyz_nm"] = gt["xyz_px"] * np.array([*cfg.px_size_nm, 1.0])
    read_var = read_noise_variance(cfg, getattr(movie, "sensor_origin", None))
    gt["crlb_nm"] = emitter_crlb_nm(gt["xyz_px"], gt["phot"], gt["bg"], cfg,
                                    read_var=np.asarray(read_var, dtype=np.float64))
    gt["crlb_lat_nm"] = np.hypot(gt["crlb_nm"][:, 0], gt["crlb_nm"][:, 1])
    return gt


def crlb_oracle(gt: dict, seed: int = 0) -> dict:
    """Detections of an ideal fitter: every ground-truth emitter of `ground_truth`, found, at its true position
    plus independent Normal noise of its own bound on each axis (crlb_nm; no noise on an axis whose bound is
    NaN, z of a 2D PSF). Scored through the same matching as a method, it is the reference that "within X of
    the physical limit" is measured against: its rmse_over_crlb is 1 up to sampling noise, and its Jaccard
    is below 1 only where the noise carries an emitter past the matching radius. frame_ix and xyz_nm.
    Raises ValueError when a lateral bound is not finite (a spline PSF has none): there is no limit to scatter by."""
    if not np.isfinite(gt["crlb_nm"][:, :2]).all():
        raise ValueError("the CRLB oracle needs a finite lateral bound for every emitter (gaussian or astigmatic PSF)")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(gt["crlb_nm"].shape) * np.nan_to_num(gt["crlb_nm"], nan=0.0)
    return {"frame_ix": gt["frame_ix"].copy(), "xyz_nm": gt["xyz_nm"] + noise}
