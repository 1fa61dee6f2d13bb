"""Poisson maximum-likelihood fit of the astigmatic (or 2D) Gaussian PSF in small ROIs, batched in torch, and
its use on SigmaMUNet's detections (`refine_detections`).

The fit (PsfModel, mle_fit) is the one of the classical fitter, benchmarks/smlm_classical.py, whose module
docstring gives the camera model, the parameters, bounds and the Levenberg-Marquardt iteration; it lives here so
that fit_smlm.py can use it. Units: frames in photons, (x, y) px with pixel (row i, col j) centred at (x, y) =
(j, i), z nm. The classical fitter fits photons / F^2 (F^2 = 2 for an EMCCD at high gain, 1 otherwise) plus the
sCMOS read-noise offset v = r / qe; the refinement fits qe times that, photoelectrons / F^2 plus r / F^2, whose
variance equals its mean (a Poisson-like count) for any qe. Both give the same estimates (a Poisson likelihood
of c d and c mu has its maximum where that of d and mu has it); only the latter's deviance and expected
information are those of the counts, as the goodness-of-fit test and the standard errors need.

Refinement of network detections (`refine_detections`)
    SigmaMUNet localises from a 3-frame window through a small network; on bright emitters its error stays
    above the single-frame bound (docs/smlm.md) where a likelihood fit of the frame itself reaches it. The
    detections of frame t closer than link_px (default: the ROI radius) to each other, linked in chains, are
    fitted together when a chain has at most MAX_JOINT of them (longer chains are fitted one detection at a
    time, the rest held fixed as below): one ROI of frame t covering them with roi_radius px to spare (as far
    as the frame allows), a model of their spots on one flat background, (x, y, [z,] N) per emitter and b,
    started at the network's estimates. The frame's other detections are part of the model as fixed spots at
    their current estimates (N times the PSF at x, y, z, added like the read-noise offset), so a neighbour's
    light is not mistaken for this emitter's; the second pass (passes = 2, the default) fits again with them
    where the first put them.
    A refined estimate replaces the network's only when
      - its cluster's fit converged (Newton decrement < DECREMENT_TOL) to finite values,
      - the fit passes a goodness-of-fit test at level gof_alpha (REFINE_GOF_ALPHA): twice the deviance is
        below the chi^2 quantile with S^2 - P degrees of freedom, so an ROI holding light the model lacks (a
        neighbour the network missed) keeps the network's values,
      - N > 1 count (F^2 / qe photons), x, y inside the frame extent [-0.5, W - 0.5] x [-0.5, H - 0.5] px,
        moved at most max_shift_px from the network's estimate, and
      - its own lateral standard error sqrt(var_x + var_y), from the inverse expected information at the fit,
        is below the network's predicted sqrt(sigma_x^2 + sigma_y^2): dim emitters, which the network
        localises better from three frames than any fit of one frame can, keep the network's values.
    Replaced rows get the fit's x, y, photons, background and standard errors (xyz_sig_*, phot_sig: the
    Cramer-Rao standard deviations at the estimate). Their z and sigma_z are the fit's too when z is inside
    the calibrated range (a fit pinned on its end says only that z is beyond it) and its standard error is
    below the network's predicted sigma_z; else the network's. The other keys (prob, pixel, param_out,
    sigma_out: the network's raw outputs) are unchanged. Every cluster's ROI and fit depend only on its
    frame's detections, so the result does not depend on how a movie is cut into chunks.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.stats
import torch

from data.smlm import SimConfig, counted_qe, excess_noise, pixel_gaussian, psf_sigmas, read_noise_variance

DECREMENT_TOL = 5e-2      # Newton decrement g^T I^-1 g below which a fit counts as converged
REFINE_ITERATIONS = 15    # the start is the network's estimate, already close: fewer steps than from a centroid
REFINE_MAX_SHIFT_PX = 1.0
MAX_JOINT = 4             # the most detections fitted together; a larger chain is fitted one by one
REFINE_GOF_ALPHA = 0.05   # level of the goodness-of-fit test a refit must pass


def read_var_photons(cfg: SimConfig, shape: tuple[int, int], device) -> torch.Tensor:
    """(H, W) read-noise offset v = r / qe in photons (r the read variance in e-^2) that the fit adds to data
    and model (sCMOS only; module docstring)."""
    var = torch.as_tensor(read_noise_variance(cfg), dtype=torch.float32) / cfg.qe
    if var.ndim == 2 and tuple(var.shape) != tuple(shape):
        raise ValueError(f"frames of {shape[0]}x{shape[1]} px do not match the {var.shape[0]}x{var.shape[1]} px "
                         f"read-noise window of the camera (img_size {list(cfg.img_size)}, sensor_origin "
                         f"{cfg.sensor_origin}); set img_size to the frames' size")
    return var.to(device).expand(shape)


class PsfModel:
    """Parameter layout, calibration and model of one fit of `emitters` spots on one flat background: theta
    (R, P) = (x, y, [z,] N) per emitter, then b, with x, y in ROI px; one emitter is (x, y, [z,] N, b)."""

    def __init__(self, cfg: SimConfig, size: int, emitters: int = 1):
        self.cfg = cfg
        self.astig = cfg.psf == "astigmatic"
        self.size = size
        self.emitters = emitters
        z_lo, z_hi = cfg.z_range_nm
        self.z_lim = (z_lo, z_hi)
        self.block = 4 if self.astig else 3                  # parameters per emitter
        self.n_ix = self.block - 1                           # N of the first emitter
        self.b_ix = emitters * self.block
        self.n_par = self.b_ix + 1

    def sigmas(self, theta, k: int = 0):
        """(sigma_x, sigma_y, d sigma_x / dz, d sigma_y / dz) of emitter k per ROI; the 2D PSF's widths do not
        depend on theta."""
        at = k * self.block
        return psf_sigmas(theta[:, at + 2] if self.astig else torch.zeros_like(theta[:, at]), self.cfg,
                          with_dz=True)

    def model(self, theta, jacobian: bool = True):
        """mu (R, S*S) photons and, if asked, d mu / d theta (R, S*S, P)."""
        b = theta[:, self.b_ix, None, None]
        mu = b.expand(-1, self.size, self.size)
        cols = []
        for k in range(self.emitters):
            at = k * self.block
            sx, sy, dsx, dsy = self.sigmas(theta, k)
            ex, dex, dex_s = pixel_gaussian(self.size, theta[:, at], sx, derivatives=True)
            ey, dey, dey_s = pixel_gaussian(self.size, theta[:, at + 1], sy, derivatives=True)
            n = theta[:, at + self.block - 1, None, None]
            psf = ey[:, :, None] * ex[:, None, :]                                 # (R, S, S)
            mu = mu + n * psf
            if jacobian:
                cols += [n * ey[:, :, None] * dex[:, None, :], n * dey[:, :, None] * ex[:, None, :]]
                if self.astig:
                    cols.append(n * (ey[:, :, None] * (dex_s * dsx[:, None])[:, None, :]
                                     + (dey_s * dsy[:, None])[:, :, None] * ex[:, None, :]))
                cols.append(psf)
        if not jacobian:
            return mu.flatten(1), None
        cols.append(torch.ones_like(mu))
        return mu.flatten(1), torch.stack([c.flatten(1) for c in cols], dim=-1)

    def bounds(self, like: torch.Tensor):
        """(P,) lower and upper bounds: x, y up to 1 px beyond the ROI, z in the calibrated range, N >= 1, b > 0."""
        lo = ([-1.5, -1.5] + ([self.z_lim[0]] if self.astig else []) + [1.0]) * self.emitters + [1e-2]
        hi = ([self.size + 0.5, self.size + 0.5] + ([self.z_lim[1]] if self.astig else []) + [math.inf]
              ) * self.emitters + [math.inf]
        return like.new_tensor(lo), like.new_tensor(hi)

    def clamp(self, theta):
        lo, hi = self.bounds(theta)
        return torch.maximum(torch.minimum(theta, hi), lo)


def poisson_deviance(mu, data):
    """Poisson negative log-likelihood per ROI as the deviance sum mu - d + d log(d / mu) (data >= 0): it
    differs from sum mu - d log mu only by a term of the data, and its summands are small, so float32
    resolves the changes of the last iterations."""
    return (mu - data + torch.xlogy(data, data / mu)).sum(1)


def normal_equations(mu, jac, data):
    """Gradient of the NLL (R, P) and the expected information J^T diag(1/mu) J (R, P, P), in float64."""
    jac, mu, data = jac.double(), mu.double(), data.double()
    grad = torch.einsum("rkp,rk->rp", jac, 1 - data / mu)
    info = torch.einsum("rkp,rkq->rpq", jac / mu[..., None], jac)
    return grad, info


def active_set(psf: PsfModel, theta, grad, info):
    """Freeze the parameters that sit on a bound with the likelihood pulling them across it (projected
    Newton): their gradient, row and column are zeroed and the diagonal set to 1, so their step is 0."""
    lo, hi = psf.bounds(theta)
    pinned = ((theta <= lo) & (grad > 0)) | ((theta >= hi) & (grad < 0))         # (R, P)
    free = (~pinned).double()
    grad = grad * free
    info = info * free[:, :, None] * free[:, None, :] + torch.diag_embed(1.0 - free)
    return grad, info


def mle_fit(psf: PsfModel, data: torch.Tensor, offset: torch.Tensor, theta: torch.Tensor, iterations: int = 25):
    """Levenberg-Marquardt with Fisher scoring (module docstring) on ROIs data (R, S*S) >= 0 in fitted units
    (offset (R, S*S) a known part of the model, e.g. the sCMOS read variance; zero otherwise). Returns theta
    (R, P), NLL (R,), the final Newton decrement (R,) over the parameters not pinned on a bound, and the
    diagonal of the inverse expected information of all parameters (R, P): the Cramer-Rao variances at the
    estimate (for a parameter on its bound, those of the unconstrained model)."""
    theta = psf.clamp(theta)
    mu, jac = psf.model(theta)
    mu = mu + offset
    nll = poisson_deviance(mu, data)
    lam = torch.full((len(theta),), 1e-3, dtype=torch.float64, device=theta.device)
    for _ in range(iterations):
        grad, info = active_set(psf, theta, *normal_equations(mu, jac, data))
        step = -solve_scaled(info + lam[:, None, None] * torch.diag_embed(torch.diagonal(info, dim1=1, dim2=2)), grad)
        trial = psf.clamp(theta + step.to(theta.dtype))
        mu_t, jac_t = psf.model(trial)
        mu_t = mu_t + offset
        nll_t = poisson_deviance(mu_t, data)
        ok = torch.isfinite(nll_t) & (nll_t <= nll)
        theta = torch.where(ok[:, None], trial, theta)
        mu = torch.where(ok[:, None], mu_t, mu)
        jac = torch.where(ok[:, None, None], jac_t, jac)
        nll = torch.where(ok, nll_t, nll)
        lam = torch.where(ok, lam * 0.1, lam * 10.0).clamp(1e-7, 1e7)
    grad, info = normal_equations(mu, jac, data)
    variance = inverse_diagonal(info)  # every parameter free: a parameter on its bound keeps its uncertainty
    grad, info = active_set(psf, theta, grad, info)
    decrement = (grad * solve_scaled(info, grad)).sum(1)
    return theta, nll, decrement, variance


def solve_scaled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x = a^-1 b for (R, P, P) symmetric a and (R, P) b, Jacobi-scaled (the entries span photons^2 to px^-2)
    with a 1e-10 ridge on the scaled diagonal; a singular system gives NaN, which the caller rejects."""
    d = torch.diagonal(a, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()                 # (R, P)
    scaled = a * d[:, :, None] * d[:, None, :] + 1e-10 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    x, status = torch.linalg.solve_ex(scaled, (b * d)[..., None])
    x = x[..., 0] * d
    return torch.where((status == 0)[:, None] & torch.isfinite(x), x, torch.full_like(x, float("nan")))


def inverse_diagonal(info: torch.Tensor) -> torch.Tensor:
    """diag(info^-1) (R, P) for (R, P, P) symmetric positive definite info, Jacobi-scaled as solve_scaled; NaN
    where it is singular."""
    d = torch.diagonal(info, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    eye = torch.eye(info.shape[-1], dtype=info.dtype, device=info.device)
    inv, status = torch.linalg.inv_ex(info * d[:, :, None] * d[:, None, :] + 1e-10 * eye)
    var = torch.diagonal(inv, dim1=1, dim2=2) * d * d
    return torch.where((status == 0)[:, None] & torch.isfinite(var), var, torch.full_like(var, float("nan")))


def crop_at(img: torch.Tensor, t, oy, ox, size: int) -> torch.Tensor:
    """(R, size, size) crops of img (T, H, W): frame t, top-left pixel (oy, ox), each (R,) int64."""
    k = torch.arange(size, device=img.device)
    return img[t[:, None, None], (oy[:, None] + k)[:, :, None], (ox[:, None] + k)[:, None, :]]


def crop_rois(img: torch.Tensor, t, row, col, radius: int):
    """(R, S, S) crops of img (T, H, W) around (row, col), shifted inwards at the edges, and their origins."""
    h, w = img.shape[-2:]
    size = 2 * radius + 1
    oy = (row - radius).clamp(0, h - size)
    ox = (col - radius).clamp(0, w - size)
    return crop_at(img, t, oy, ox, size), oy, ox


def _frame_candidates(t_rows, t):
    """(R, K) indices into the frame-sorted detections t (M,) of the detections of each row's frame t_rows (R,),
    K the most detections of one frame, and the (R, K) mask of the real ones."""
    first = torch.searchsorted(t, t_rows, right=False)
    count = torch.searchsorted(t, t_rows, right=True) - first
    k = max(int(count.max()), 1) if len(t_rows) else 1
    j = first[:, None] + torch.arange(k, device=t.device)[None, :]
    valid = j < (first + count)[:, None]
    return j.clamp_max(max(len(t) - 1, 0)), valid


def _other_light(t_roi, label_roi, oy, ox, size: int, t, label, xyz, phot, cfg: SimConfig, reach: float):
    """(R, S, S) light, in the units of phot, that the detections of each ROI's frame outside its own cluster
    (label != label_roi) put into it: phot_j times j's PSF at (x_j, y_j, z_j), for those within `reach` px
    (each of x, y) of the ROI's centre. t (M,) sorted by frame; oy, ox the ROIs' top-left pixels."""
    light = xyz.new_zeros((len(t_roi), size, size))
    if len(t_roi) == 0 or len(t) == 0:
        return light
    j, valid = _frame_candidates(t_roi, t)
    r = torch.arange(len(t_roi), device=t.device)[:, None].expand_as(j)
    centre = torch.stack([ox, oy], 1).to(xyz.dtype) + (size - 1) / 2
    near = (xyz[j, :2] - centre[:, None, :]).abs().amax(-1) <= reach
    keep = valid & near & (label[j] != label_roi[:, None])
    r, j = r[keep], j[keep]
    if len(r) == 0:
        return light
    sx, sy = psf_sigmas(xyz[j, 2], cfg)
    ex = pixel_gaussian(size, xyz[j, 0] - ox[r].to(xyz.dtype), sx)               # (P, S)
    ey = pixel_gaussian(size, xyz[j, 1] - oy[r].to(xyz.dtype), sy)
    light.index_add_(0, r, phot[j, None, None] * ey[:, :, None] * ex[:, None, :])
    return light


def _clusters(t, xy, link_px: float, max_joint: int) -> np.ndarray:
    """(M,) cluster label per detection: detections of one frame closer than link_px (each of x, y), linked
    in chains, share a label; a cluster of more than max_joint detections is split into single ones."""
    m = len(t)
    j, valid = _frame_candidates(t, t)
    r = torch.arange(m, device=t.device)[:, None].expand_as(j)
    close = valid & (j > r) & ((xy[j] - xy[:, None, :]).abs().amax(-1) < link_px)
    graph = scipy.sparse.coo_matrix((np.ones(int(close.sum())), (r[close].cpu().numpy(), j[close].cpu().numpy())),
                                    shape=(m, m))
    _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    big = np.bincount(label)[label] > max_joint
    label[big] = label.max() + 1 + np.arange(int(big.sum()))
    return label


@torch.no_grad()
def refine_detections(det: dict[str, np.ndarray], frames_photons, cfg: SimConfig, *, roi_radius: int | None = None,
                      iterations: int = REFINE_ITERATIONS, max_shift_px: float = REFINE_MAX_SHIFT_PX,
                      passes: int = 2, gof_alpha: float | None = REFINE_GOF_ALPHA,
                      link_px: float | None = None, max_joint: int = MAX_JOINT, batch_rois: int = 8192,
                      device=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Maximum-likelihood refinement of network detections (module docstring).

    det: detections of frames_photons (models.sigma_munet_post keys, numpy, sorted by frame as fit_smlm.localise
    returns them; frame_ix indexes frames_photons (T, H, W) photons). cfg: the run's SimConfig (PSF, camera).
    roi_radius defaults to max(3, ceil(2.5 sigma)) of the in-focus PSF (benchmarks/smlm_classical.py);
    link_px (default roi_radius) and max_joint say which detections are fitted together. Returns the refined
    detections (same keys and rows) and a bool mask (N,) of the rows whose values the fit replaced. Runs on
    `device` (default: the frames'). Raises ValueError for a PSF other than "gaussian" or "astigmatic",
    frames smaller than the ROI, or detections not sorted by frame.
    """
    if cfg.psf not in ("gaussian", "astigmatic"):
        raise ValueError(f"psf {cfg.psf!r}: the maximum-likelihood refinement knows only 'gaussian' and "
                         f"'astigmatic'")
    if passes < 1 or iterations < 1 or max_shift_px <= 0 or max_joint < 1:
        raise ValueError(f"passes, iterations and max_joint must be >= 1 and max_shift_px > 0, got {passes}, "
                         f"{iterations}, {max_joint}, {max_shift_px}")
    if gof_alpha is not None and not 0 < gof_alpha < 1:
        raise ValueError(f"gof_alpha must be in (0, 1) or None, got {gof_alpha}")
    frames = torch.as_tensor(frames_photons)
    frames = frames.to(device=frames.device if device is None else device, dtype=torch.float32)
    dev = frames.device
    if frames.ndim != 3:
        raise ValueError(f"frames must be (T, H, W), got shape {tuple(frames.shape)}")
    h, w = frames.shape[-2:]
    s0 = float(psf_sigmas(torch.zeros(1, dtype=torch.float64), cfg)[0])
    radius = max(3, math.ceil(2.5 * s0)) if roi_radius is None else int(roi_radius)
    link = float(radius) if link_px is None else float(link_px)
    single = 2 * radius + 1
    if h < single or w < single:
        raise ValueError(f"frames of {h}x{w} px are smaller than the {single}x{single} px ROI; lower roi_radius")
    if single * single <= max_joint * (4 if cfg.psf == "astigmatic" else 3) + 1:
        raise ValueError(f"a {single}x{single} px ROI has fewer pixels than {max_joint} emitters have parameters; "
                         f"raise roi_radius or lower max_joint")
    out = {k: v.copy() for k, v in det.items()}
    n = len(det["frame_ix"])
    replaced = np.zeros(n, dtype=bool)
    if n == 0:
        return out, replaced
    t = torch.as_tensor(det["frame_ix"], dtype=torch.int64, device=dev)
    if bool((t[1:] < t[:-1]).any()) or int(t.min()) < 0 or int(t.max()) >= len(frames):
        raise ValueError(f"detections must be sorted by frame and index the {len(frames)} frames")
    # Counts in photoelectrons / F^2: their variance equals their mean (module docstring), which the
    # goodness-of-fit test and the standard errors need; the classical fitter's photons / F^2 are that times
    # 1 / qe, which moves no estimate but scales the deviance and the information by qe.
    unit = counted_qe(cfg) / excess_noise(cfg)
    read_var = read_var_photons(cfg, (h, w), dev)
    fit_img = ((frames + read_var) * unit).clamp_min(0)
    offset_img = (read_var * unit).expand_as(frames)
    z_lo, z_hi = cfg.z_range_nm
    astig = cfg.psf == "astigmatic"
    block = 4 if astig else 3

    net_xyz = torch.as_tensor(det["xyz_px"], dtype=torch.float32, device=dev)
    net_sig_px = torch.as_tensor(det["xyz_sig_px"], dtype=torch.float32, device=dev)
    net_sig = net_sig_px[:, :2].square().sum(1).sqrt()
    xyz = net_xyz.clone()
    xyz[:, 2] = xyz[:, 2].clamp(z_lo, z_hi) if astig else 0.0
    phot = torch.as_tensor(det["phot"], dtype=torch.float32, device=dev).clamp_min(1.0) * unit
    bg = torch.as_tensor(det["bg"], dtype=torch.float32, device=dev).clamp_min(1e-2) * unit
    pix = torch.stack([net_xyz[:, 1].round().long().clamp(0, h - 1), net_xyz[:, 0].round().long().clamp(0, w - 1)], 1)
    label_np = _clusters(t, net_xyz[:, :2], link, max_joint)
    label = torch.as_tensor(label_np, device=dev)
    # A neighbour reaches into an ROI when its spot (3 sigma of the widest PSF of the z range) overlaps it.
    widest = max(float(v.max()) for v in psf_sigmas(torch.tensor([float(z_lo), 0.0, float(z_hi)]), cfg))

    # Clusters by size k and ROI size: member indices (C, k) and ROI origins. Each cluster's ROI is its own
    # (the single ROI widened by the members' spread), so a detection's fit does not depend on the others'.
    groups = []
    order = np.argsort(label_np, kind="stable")
    sizes = np.bincount(label_np)
    for k in np.unique(sizes[sizes > 0]):
        in_k = order[sizes[label_np[order]] == k]                          # grouped by label, k rows each
        members_k = torch.as_tensor(in_k.reshape(-1, k), device=dev)
        lo, hi = pix[members_k].amin(1), pix[members_k].amax(1)            # (C, 2) row, col
        roi = (single + (hi - lo).amax(1)).clamp_max(min(h, w))
        for size in roi.unique().tolist():
            at = roi == size
            members, lo_s, hi_s = members_k[at], lo[at], hi[at]
            oy = ((lo_s[:, 0] + hi_s[:, 0]) // 2 - (size - 1) // 2).clamp(0, h - size)
            ox = ((lo_s[:, 1] + hi_s[:, 1]) // 2 - (size - 1) // 2).clamp(0, w - size)
            tc = t[members[:, 0]]
            groups.append((int(k), members, tc, oy, ox, int(size), crop_at(fit_img, tc, oy, ox, size),
                           crop_at(offset_img, tc, oy, ox, size)))

    fit_xyz, fit_phot, fit_bg = xyz.clone(), phot.clone(), bg.clone()
    fit_var = torch.full((n, block), math.nan, dtype=torch.float64, device=dev)
    ok = torch.zeros(n, dtype=torch.bool, device=dev)
    ok_z = torch.zeros(n, dtype=torch.bool, device=dev)
    for _ in range(passes):
        new_xyz, new_phot = xyz.clone(), phot.clone()
        for k, members, tc, oy, ox, size, data, offset in groups:
            psf = PsfModel(cfg, size, emitters=k)
            light = _other_light(tc, label[members[:, 0]], oy, ox, size, t, label, xyz, phot, cfg,
                                 reach=size / 2 + 3 * widest)
            corner = torch.stack([ox, oy], 1).to(xyz.dtype)[:, None, :]             # (C, 1, 2) x, y
            per = torch.cat([xyz[members, :2] - corner, xyz[members, 2:] if astig else xyz[members, :0],
                             phot[members, None]], -1)                              # (C, k, block)
            theta0 = torch.cat([per.flatten(1), bg[members].mean(1, keepdim=True)], 1)
            parts = [mle_fit(psf, data[sl].flatten(1), (offset[sl] + light[sl]).flatten(1), theta0[sl], iterations)
                     for sl in (slice(s, s + batch_rois) for s in range(0, len(members), batch_rois))]
            theta, nll, decrement, var = (torch.cat(p) for p in zip(*parts))
            # Goodness of fit: twice the deviance sum is ~ chi^2 with S^2 - P degrees of freedom when the model
            # holds; light the model lacks (a neighbour the network missed) makes it larger.
            dof = size * size - psf.n_par
            limit = math.inf if gof_alpha is None else float(scipy.stats.chi2.ppf(1.0 - gof_alpha, dof))
            good = (torch.isfinite(theta).all(1) & torch.isfinite(var).all(1) & (decrement < DECREMENT_TOL)
                    & (2 * nll <= limit))                                           # (C,)
            est = theta[:, :-1].reshape(len(members), k, block)
            est_var = var[:, :-1].reshape(len(members), k, block)
            xy = est[..., :2] + corner
            rows = members.flatten()
            inside = ((xy >= -0.5) & (xy <= xy.new_tensor([w - 0.5, h - 0.5]))).all(-1)
            keep = (good[:, None] & (est[..., -1] > 1.0) & inside
                    & ((xy - net_xyz[members, :2]).abs().amax(-1) <= max_shift_px)
                    & (est_var[..., :2].sum(-1).sqrt() < net_sig[members])).flatten()
            ok[rows] = keep
            if astig:  # z on its own terms: off the range's ends, more precise than the network's
                z_fit, z_var = est[..., 2].flatten(), est_var[..., 2].flatten()
                ok_z[rows] = (keep & (z_fit > z_lo + 1e-3) & (z_fit < z_hi - 1e-3)
                              & (z_var.sqrt() < net_sig_px[rows, 2]))
            fit_xyz[rows, :2] = xy.reshape(-1, 2)
            if astig:
                fit_xyz[rows, 2] = torch.where(ok_z[rows], est[..., 2].flatten(), xyz[rows, 2])
            fit_phot[rows] = est[..., -1].flatten()
            fit_bg[rows] = theta[:, -1, None].expand(-1, k).flatten()
            fit_var[rows] = est_var.reshape(-1, block)
            # The next pass sees the neighbours where this one put them (only where the fit is kept).
            new_xyz[rows] = torch.where(keep[:, None], fit_xyz[rows], xyz[rows])
            new_phot[rows] = torch.where(keep, fit_phot[rows], phot[rows])
        xyz, phot = new_xyz, new_phot

    keep, keep_z = ok.cpu().numpy(), ok_z.cpu().numpy()
    if not keep.any():
        return out, replaced
    # Only the replaced rows are written (the others keep the network's values to the last bit).
    px = np.array(cfg.px_size_nm, dtype=np.float64)
    std = fit_var.clamp_min(0).sqrt().cpu().numpy()
    fitted = fit_xyz.double().cpu().numpy()
    for value, key_px, key_nm in ((fitted, "xyz_px", "xyz_nm"), (std, "xyz_sig_px", "xyz_sig_nm")):
        out[key_px][keep, :2] = value[keep, :2]
        out[key_nm][keep, :2] = value[keep, :2] * px
        out[key_px][keep_z, 2] = out[key_nm][keep_z, 2] = value[keep_z, 2]   # z is nm in both
    out["phot"][keep] = fit_phot.double().cpu().numpy()[keep] / unit
    out["phot_sig"][keep] = std[keep, block - 1] / unit
    out["bg"][keep] = fit_bg.double().cpu().numpy()[keep] / unit
    replaced[keep] = True
    return out, replaced
