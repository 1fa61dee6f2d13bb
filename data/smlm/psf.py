"""Point-spread functions (smlm.md §1.3): the Gaussian widths, the pixel-integrated Gaussian, the cubic-spline
PSF of a SMAP calibration, and `render` (expected photons per pixel of a frame's emitters).

The pixel-integrated Gaussian and the astigmatic width curve are written once, here, and used by the
simulator, the CRLB (metrics/smlm_crlb.py) and the classical fitter (benchmarks/smlm_classical.py).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import scipy.io
import scipy.ndimage
import torch

if TYPE_CHECKING:
    from .config import SimConfig
    from .simulate import Emitters


def psf_sigmas(z_nm: torch.Tensor, cfg: SimConfig, with_dz: bool = False):
    """(sigma_x, sigma_y) in px at depth z_nm (smlm.md §1.3), each shaped like z_nm: sigma0 for "gaussian"; for
    "astigmatic" sigma_x = sigma0 sqrt(1 + ((z + foc_shift) / rl)^2), sigma_y = sigma0 sqrt(1 + ((z - foc_shift)
    / rl)^2). The spline PSF has no such widths: NaN for psf "spline" (metrics.smlm_crlb.emitter_crlb_nm gives
    NaN there). with_dz adds d sigma_x / dz and d sigma_y / dz (px per nm), for the z column of the CRLB's and
    the classical fitter's Jacobians."""
    if cfg.psf == "spline":
        s = torch.full_like(z_nm, math.nan)
        return (s, s, s, s) if with_dz else (s, s)
    if cfg.psf == "gaussian":
        s = torch.full_like(z_nm, cfg.sigma0_px)
        return (s, s, torch.zeros_like(s), torch.zeros_like(s)) if with_dz else (s, s)
    s0, f, rl = cfg.sigma0_px, cfg.foc_shift_nm, cfg.rl_nm
    sx = s0 * torch.sqrt(1 + ((z_nm + f) / rl) ** 2)
    sy = s0 * torch.sqrt(1 + ((z_nm - f) / rl) ** 2)
    if not with_dz:
        return sx, sy
    return sx, sy, s0 ** 2 * (z_nm + f) / (rl ** 2 * sx), s0 ** 2 * (z_nm - f) / (rl ** 2 * sy)


def pixel_gaussian(n_px: int, pos: torch.Tensor, sigma: torch.Tensor, derivatives: bool = False):
    """Fraction (..., n_px) of a 1D Gaussian (mean pos, std sigma, px) on each pixel [c - 1/2, c + 1/2),
    c = 0 .. n_px - 1: (Phi(b) - Phi(a)), a, b = (c -+ 1/2 - pos) / sigma. pos and sigma broadcast to (...).
    A 2D PSF is the outer product of the x and y fractions (pixel (row i, col j) centred at (x, y) = (j, i)).

    derivatives: also d/d pos = (phi(a) - phi(b)) / sigma and d/d sigma = (a phi(a) - b phi(b)) / sigma,
    phi the standard normal density, each (..., n_px)."""
    pos, sigma = torch.broadcast_tensors(pos, sigma)
    centres = torch.arange(n_px, device=pos.device, dtype=pos.dtype)
    scale = (sigma * math.sqrt(2.0))[..., None]
    lo = (centres - 0.5 - pos[..., None]) / scale                          # a / sqrt(2)
    hi = (centres + 0.5 - pos[..., None]) / scale                          # b / sqrt(2)
    # erfc differences in the tails: erf(hi) - erf(lo) cancels to 0 there in float32.
    right = torch.special.erfc(lo) - torch.special.erfc(hi)
    left = torch.special.erfc(-hi) - torch.special.erfc(-lo)
    mass = 0.5 * torch.where(lo > 0, right, torch.where(hi < 0, left, torch.erf(hi) - torch.erf(lo)))
    if not derivatives:
        return mass
    a, b = lo * math.sqrt(2.0), hi * math.sqrt(2.0)
    phi_a = torch.exp(-lo * lo) / math.sqrt(2 * math.pi)
    phi_b = torch.exp(-hi * hi) / math.sqrt(2 * math.pi)
    s = sigma[..., None]
    return mass, (phi_a - phi_b) / s, (a * phi_a - b * phi_b) / s


# Uniform cubic B-spline: power coefficients (rows t^0 .. t^3) on [0, 1) from the B-spline coefficients at
# knots -1, 0, 1, 2.
_BSPLINE = np.array([[1.0, 4.0, 1.0, 0.0],
                     [-3.0, 0.0, 3.0, 0.0],
                     [3.0, -6.0, 3.0, 0.0],
                     [-1.0, 3.0, -3.0, 1.0]]) / 6.0


class SplinePSF:
    """Cubic-spline PSF of a SMAP calibration (smlm.md §1.3), evaluated in torch.

    coeff (Nx, Ny, Nz, 64) float32: axis 0 is x (frame columns, W), axis 1 is y (rows, H), axis 2 is z, as DECODE
    reads SMAP's SXY.cspline.coeff. Spline coordinates (u, v, w) are voxel units, voxel (i, j, k) covering
    [i, i+1) x [j, j+1) x [k, k+1), and there the PSF is sum_{a,b,c} coeff[i, j, k, a + 4b + 16c] du^a dv^b dw^c
    with (du, dv, dw) the offsets inside the voxel. The value at pixel centre (px, py) of an emitter at (x px,
    y px, z nm) is the spline at u = x0 - 1 + px - x, v = x0 - 1 + py - y, w = z0 + z / dz_nm: SMAP's reference
    (x0 1-based, used for x and y; z0 taken as is, which SMAP's fitters and DECODE do). The spline holds
    pixel-integrated values, so an emitter's image is photons * spline, not renormalised: SMAP calibrations sum to
    about 1 in focus. Outside the Nx x Ny box the PSF is 0; z must lie in `z_range_nm`.
    """

    def __init__(self, coeff, x0: float, z0: float, dz_nm: float, source: str = "<array>"):
        coeff = torch.as_tensor(np.asarray(coeff, dtype=np.float32))
        if coeff.ndim != 4 or coeff.shape[3] != 64 or min(coeff.shape) < 1:
            raise ValueError(f"{source}: spline coefficients must be (Nx, Ny, Nz, 64), got {tuple(coeff.shape)}")
        x0, z0, dz_nm = float(x0), float(z0), float(dz_nm)
        if not (math.isfinite(x0) and math.isfinite(z0) and math.isfinite(dz_nm) and dz_nm > 0
                and bool(torch.isfinite(coeff).all())):
            raise ValueError(f"{source}: spline needs finite x0, z0, coefficients and dz > 0 nm, "
                             f"got x0={x0}, z0={z0}, dz={dz_nm}")
        # (Nz, Ny, Nx, 64): one z slice per emitter is gathered, laid out as (rows, cols) of the frame.
        self._table = {torch.device("cpu"): coeff.permute(2, 1, 0, 3).contiguous()}
        self.x0, self.z0, self.dz_nm, self.source = x0, z0, dz_nm, str(source)

    @property
    def coeff(self) -> torch.Tensor:
        """(Nx, Ny, Nz, 64) view in SMAP's axis order."""
        return self._table[torch.device("cpu")].permute(2, 1, 0, 3)

    @property
    def z_range_nm(self) -> tuple[float, float]:
        """z interval (nm) the spline covers, w in [0, Nz]."""
        nz = self._table[torch.device("cpu")].shape[0]
        return (-self.z0 * self.dz_nm, (nz - self.z0) * self.dz_nm)

    def render(self, emitters: Emitters, n_frames: int, img_size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
        """Expected photons per pixel (n_frames, H, W), dtype and device of emitters.xyz: each emitter adds
        phot * PSF on the Nx x Ny pixels its spline box covers, clipped at the frame border. Emitters go
        `chunk` at a time, fewer for large calibrations, to bound the (chunk, Ny * Nx, 64) gather."""
        h, w = img_size
        xyz = emitters.xyz
        dev = xyz.device
        if dev not in self._table:
            self._table[dev] = self._table[torch.device("cpu")].to(dev)
        table = self._table[dev]
        nz, ny, nx = table.shape[:3]
        out = torch.zeros(n_frames * h * w, dtype=xyz.dtype, device=dev)
        tz_all = self.z0 + xyz[:, 2] / self.dz_nm
        # 1e-3 slice of slack: float32 z at a range bound lands a rounding error outside it.
        if bool(((tz_all < -1e-3) | (tz_all > nz + 1e-3)).any()):
            raise ValueError(f"{self.source}: emitter z outside the spline's z range "
                             f"[{self.z_range_nm[0]:g}, {self.z_range_nm[1]:g}] nm")
        powers = torch.arange(4, device=dev, dtype=xyz.dtype)
        rows, cols = torch.arange(ny, device=dev), torch.arange(nx, device=dev)
        step = max(1, min(chunk, 2**23 // (ny * nx * 64)))
        for s in range(0, len(emitters), step):
            part = slice(s, s + step)
            tx, ty, tz = self.x0 - 1 - xyz[part, 0], self.x0 - 1 - xyz[part, 1], tz_all[part]
            # u = px + tx, so voxel i = px + floor(tx) and the offset inside it, frac(tx), is the same for every px.
            ix, iy, iz = torch.floor(tx), torch.floor(ty), torch.floor(tz).clamp(0, nz - 1)
            fx, fy, fz = tx - ix, ty - iy, tz - iz
            mono = ((fz[:, None] ** powers)[:, :, None, None] * (fy[:, None] ** powers)[:, None, :, None]
                    * (fx[:, None] ** powers)[:, None, None, :]).reshape(-1, 64)   # (n, 64), index a + 4b + 16c
            slab = table[iz.long()].view(-1, ny * nx, 64)                               # (n, Ny*Nx, 64)
            val = torch.bmm(slab, mono.to(table.dtype)[:, :, None])[:, :, 0].to(xyz.dtype)
            val = (val * emitters.phot[part, None].to(xyz.dtype)).view(-1, ny, nx)
            row = rows[None, :] - iy.long()[:, None]                                    # (n, Ny) frame rows
            col = cols[None, :] - ix.long()[:, None]                                    # (n, Nx) frame cols
            inside = (((row >= 0) & (row < h))[:, :, None] & ((col >= 0) & (col < w))[:, None, :])
            flat = emitters.frame_ix[part, None, None] * (h * w) + row[:, :, None] * w + col[:, None, :]
            # Clipped pixels add 0 at index 0 instead of being dropped: no data-dependent shapes.
            out.index_add_(0, torch.where(inside, flat, 0).flatten(), torch.where(inside, val, 0).flatten())
        return out.view(n_frames, h, w)


def load_smap_spline(path) -> SplinePSF:
    """`SplinePSF` of a SMAP calibration .mat: struct SXY.cspline with coeff (Nx, Ny, Nz, 64), plain or a
    1-element cell, x0, z0, dz. MATLAB v5 files are read with scipy, v7.3 (HDF5) with h5py. Cached per process
    on (resolved path, mtime, size), so DataLoader workers and repeated configs read the file once. A missing
    or malformed file raises a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: spline calibration file not found")
    stat = path.stat()
    return _load_smap_spline_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_smap_spline_cached(path: str, mtime_ns: int, size: int) -> SplinePSF:
    try:
        coeff, x0, z0, dz = (_read_smap_h5 if h5py.is_hdf5(path) else _read_smap_v5)(path)
        coeff = np.asarray(coeff, dtype=np.float32)
        x0, z0, dz = (float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) for v in (x0, z0, dz))
    except (OSError, KeyError, AttributeError, TypeError, ValueError, IndexError, NotImplementedError,
            scipy.io.matlab.MatReadError) as e:
        raise ValueError(f"{path}: not a readable SMAP spline calibration (expected struct SXY.cspline with "
                         f"coeff, x0, z0, dz): {e}") from None
    return SplinePSF(coeff, x0, z0, dz, source=path)


def _one(value, what: str):
    """The element of a 1-element MATLAB cell or struct array (object ndarray); other values unchanged."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        if value.size != 1:
            raise ValueError(f"{what} holds {value.size} elements; expected one (a single-channel calibration)")
        return value.reshape(-1)[0]
    return value


def _read_smap_v5(path: str):
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=["SXY"])
    cspline = _one(_one(mat["SXY"], "SXY").cspline, "SXY.cspline")
    return _one(cspline.coeff, "SXY.cspline.coeff"), cspline.x0, cspline.z0, cspline.dz


def _read_smap_h5(path: str):
    with h5py.File(path, "r") as f:
        def node(parent, name):
            # Cells and struct arrays are datasets of object references; MATLAB stores arrays column-major,
            # so h5py sees the axes reversed.
            item = parent[name]
            if isinstance(item, h5py.Dataset) and h5py.check_dtype(ref=item.dtype) is not None:
                item = f[_one(item[()], name)]
            return item

        cspline = node(node(f, "SXY"), "cspline")
        return tuple(node(cspline, k)[()].T for k in ("coeff", "x0", "z0", "dz"))


def spline_from_psf_stack(stack) -> np.ndarray:
    """Tricubic coefficients (W - 1, H - 1, Nz - 1, 64) float64, SMAP/`SplinePSF` layout (x, y, z, a + 4b + 16c),
    of a sampled PSF stack (Nz, H, W): sample stack[k, r, c] is the spline's value at (u, v, w) = (c, r, k).
    It is the interpolating tricubic B-spline (mirror boundary, scipy.ndimage.spline_filter) written out per
    voxel: it passes through every sample, is C2, keeps the stack's sum under sub-pixel shifts and errs
    O(h^4). For a pixel-integrated Gaussian sampled once per pixel the lateral error at sub-pixel offsets is
    1.0 % of the peak for sigma 1.0 px and 0.3 % for sigma 1.3 px (Catmull-Rom: 2.8 % and 1.4 %). With the
    emitter at sample (kc, c, c), save with x0 = c + 1 and z0 = kc (`save_smap_spline`)."""
    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim != 3 or min(stack.shape) < 2 or not np.all(np.isfinite(stack)):
        raise ValueError(f"PSF stack must be a finite (Nz, H, W) array with every size >= 2, got shape {stack.shape}")
    beta = scipy.ndimage.spline_filter(stack.transpose(2, 1, 0), order=3, output=np.float64, mode="mirror")
    beta = np.pad(beta, 1, mode="reflect")                                             # (W + 2, H + 2, Nz + 2)

    def cubic_along(arr, axis):
        n = arr.shape[axis] - 3
        taps = [np.take(arr, np.arange(p, p + n), axis=axis) for p in range(4)]
        return np.stack([sum(m * t for m, t in zip(row, taps)) for row in _BSPLINE])

    # Each pass prepends a power axis: (a) x, then (b, a) y, then (c, b, a) z.
    coeff = cubic_along(cubic_along(cubic_along(beta, 0), 2), 4)                     # (4, 4, 4, Nx, Ny, Nz)
    return coeff.transpose(3, 4, 5, 0, 1, 2).reshape(*coeff.shape[3:], 64)


def save_smap_spline(path, coeff, x0: float, z0: float, dz_nm: float) -> None:
    """Write a SMAP-like MATLAB v5 .mat, struct SXY.cspline {coeff (Nx, Ny, Nz, 64) single, x0, z0, dz} that
    `load_smap_spline` (and DECODE) read; x0, z0 as in `SplinePSF`."""
    coeff = np.asarray(coeff, dtype=np.float32)
    SplinePSF(coeff, x0, z0, dz_nm, source=str(path))
    scipy.io.savemat(path, {"SXY": {"cspline": {"coeff": coeff, "x0": float(x0), "z0": float(z0),
                                                "dz": float(dz_nm)}}})


def render(emitters: Emitters, n_frames: int, cfg: SimConfig, chunk: int = 4096) -> torch.Tensor:
    """Expected photons per pixel (n_frames, H, W), no background. Gaussian PSFs: the sum over each frame's
    emitters of the pixel-integrated Gaussian phot/4 [erf((b-x)/(sqrt2 sx)) - erf((a-x)/(sqrt2 sx))][same in y]
    (smlm.md §1.3) over the whole frame; psf "spline": `SplinePSF.render` of cfg.spline_calib. Dtype and device
    of emitters.xyz; emitters are processed `chunk` at a time to bound the (chunk, H, W) intermediate."""
    if cfg.psf == "spline":
        return load_smap_spline(cfg.spline_calib).render(emitters, n_frames, cfg.img_size, chunk)
    h, w = cfg.img_size
    xyz = emitters.xyz
    out = torch.zeros(n_frames * h * w, dtype=xyz.dtype, device=xyz.device)
    pix = torch.arange(h * w, device=xyz.device)
    for s in range(0, len(emitters), chunk):
        part = slice(s, s + chunk)
        sx, sy = psf_sigmas(xyz[part, 2], cfg)
        ex = pixel_gaussian(w, xyz[part, 0], sx)                              # (n, W)
        ey = pixel_gaussian(h, xyz[part, 1], sy) * emitters.phot[part, None].to(xyz.dtype)   # (n, H)
        img = (ey[:, :, None] * ex[:, None, :]).flatten(1)                   # (n, H*W)
        flat_ix = emitters.frame_ix[part, None] * (h * w) + pix              # (n, H*W)
        out.index_add_(0, flat_ix.flatten(), img.flatten())
    return out.view(n_frames, h, w)

