"""Simulated single-molecule localisation movies (DECODE recipe, smlm.md §1), vectorised in torch.

Units and conventions
    x, y      px. Pixel (row i, col j) covers x in [j - 1/2, j + 1/2) and y in [i - 1/2, i + 1/2), so its centre
              is (x, y) = (j, i) and the frame extent is [-0.5, W - 0.5] x [-0.5, H - 0.5], as in losses/smlm.py
              and DECODE's `psf_extent`. x runs along the last (W) axis, y along H. nm = px * px_size_nm.
    z         nm, 0 at the focal plane.
    time      frames; frame k is the exposure [k, k + 1). Emitter on-times are continuous.
    photons   detected photons (DECODE's `qe: 1` convention, smlm.md §1.1). An emitter's `flux` is its photons
              per full frame; a frame row of `Emitters` holds the photons it emitted in that frame.
    frames    (T, H, W) float32. Cameras return ADU; `to_photons` maps them back to photons with the mean
              response (smlm.md §1.5 step 9), which is what the network sees (DECODE `convert2photons: true`,
              always on here).
    bg        photons per px per frame, added before the camera (smlm.md §1.4).

PSFs (`psf`, smlm.md §1.3): "gaussian" and "astigmatic" are pixel-integrated Gaussians (erf); "spline" is the
cubic-spline PSF of a SMAP calibration .mat (`spline_calib`), evaluated in torch by `SplinePSF` (coefficient axes
and reference point in its docstring). `spline_from_psf_stack` and `save_smap_spline` build such a file from a
sampled PSF stack, for tests and for users without SMAP.

Sampling functions take a `torch.Generator` (its device is where tensors are made), so a movie is a pure
function of the generator's seed and runs unchanged in DataLoader workers or on an accelerator. Every draw goes
through that generator, including EM gain (own Gamma sampler; torch's Gamma takes no generator).

Training items (`SMLMSimDataset`) are the `window`-frame windows of short simulated movies: items are grouped
in blocks of `block` consecutive indices, and each block is one movie of block + window - 1 frames (its own
padded blinking history) seeded by (seed, epoch, block index), cut into overlapping windows as DECODE cuts
its per-epoch movie (`SMLMLiveDataset`, smlm.md §1.7). An epoch is a fresh set of movies; an item is a pure
function of (seed, epoch, index), whatever the worker or the order of access. Simulating a block in one
vectorised call is about ten times cheaper per window than one movie per window (see
benchmarks/smlm_throughput.py). Fixed validation and test movies are whole movies (`simulate_movie`) stored
in HDF5 (`write_movie_h5` / `read_movie_h5`) and cut into windows by `MovieWindowDataset`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.ndimage
import torch
import yaml
from torch.utils.data import Dataset

PSF_KINDS = ("gaussian", "astigmatic", "spline")
CAMERA_KINDS = ("emccd", "scmos", "perfect", "noiseless")
H5_FORMAT = "smlm-movie-1"


@dataclass
class SimConfig:
    """Every physical parameter of the simulation; defaults are smlm.md §1.1 / §12 (SMLM-challenge EMCCD)."""

    img_size: tuple[int, int] = (40, 40)           # (H, W) px
    px_size_nm: tuple[float, float] = (100.0, 100.0)   # (x, y) nm per px; only for nm conversions
    emitter_av: float | None = 20.0                # mean emitters on per frame (whole field); XOR emitter_density
    emitter_density: float | None = None           # emitters on per frame per um^2; XOR emitter_av
    lifetime_avg: float = 2.0                      # mean on-time, frames (exponential)
    intensity_mu: float = 10000.0                  # flux mean, photons per full frame
    intensity_sig: float = 3000.0                  # flux std, photons per full frame
    intensity_th: float = 1e-8                     # flux floor, photons (DECODE's clamp)
    bg_uniform: tuple[float, float] = (90.0, 150.0)    # per-frame bg ~ U(lo, hi), photons/px; a scalar means lo = hi
    z_range_nm: tuple[float, float] = (-750.0, 750.0)  # emitter z ~ U(lo, hi), nm
    psf: str = "astigmatic"                        # "gaussian" (2D, sigma0), "astigmatic" (3D) or "spline" (3D)
    spline_calib: str | None = None                # psf "spline" only: SMAP calibration .mat (SXY.cspline), from cwd
    sigma0_px: float = 1.0                         # in-focus Gaussian std, px
    foc_shift_nm: float = 250.0                    # astigmatic focal shift, nm
    rl_nm: float = 280.0                           # astigmatic Rayleigh range, nm
    camera: str = "emccd"                          # "emccd", "scmos", "perfect" (Poisson only), "noiseless"
    qe: float = 1.0                                # quantum efficiency, e- per photon
    spur_noise: float = 0.002                      # spurious charge, e- per px per frame (before gain)
    em_gain: float | None = 300.0                  # mean EM gain; must be > 0 for emccd and blank for scmos
    e_per_adu: float = 45.0                        # e- per ADU
    baseline: float = 100.0                        # ADU offset
    read_sigma: float = 74.4                       # read noise std, e- (after gain)
    read_sigma_map: str | None = None              # scmos only: .npy (H, W) read noise std, e-; replaces read_sigma
    label_photon_min: float = 100.0                # emitters with fewer photons in the frame are rendered, not targets
    max_targets: int = 250                         # per-frame target cap; exceeding it raises (smlm.md §10 #12)

    def __post_init__(self):
        for key in ("img_size", "px_size_nm", "bg_uniform", "z_range_nm"):
            value = getattr(self, key)
            if key == "bg_uniform" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value, value)
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{key} must be a pair [a, b], got {value!r}")
            setattr(self, key, tuple(_number(f"{key}[{i}]", v) for i, v in enumerate(value)))
        h, w = self.img_size
        if h != int(h) or w != int(w) or h < 1 or w < 1:
            raise ValueError(f"img_size must be two positive integers [H, W], got {list(self.img_size)}")
        self.img_size = (int(h), int(w))
        _check("px_size_nm", min(self.px_size_nm) > 0, "positive", self.px_size_nm)
        if (self.emitter_av is None) == (self.emitter_density is None):
            raise ValueError("set exactly one of emitter_av (emitters per frame) and emitter_density "
                             f"(emitters per um^2 per frame), got emitter_av={self.emitter_av!r}, "
                             f"emitter_density={self.emitter_density!r}")
        for key in ("emitter_av", "emitter_density"):
            if getattr(self, key) is not None:
                _check(key, _number(key, getattr(self, key)) >= 0, "a number >= 0", getattr(self, key))
        for key in ("lifetime_avg", "sigma0_px", "rl_nm", "e_per_adu"):
            _check(key, _number(key, getattr(self, key)) > 0, "a number > 0", getattr(self, key))
        for key in ("intensity_sig", "intensity_th", "spur_noise", "read_sigma", "label_photon_min"):
            _check(key, _number(key, getattr(self, key)) >= 0, "a number >= 0", getattr(self, key))
        for key in ("intensity_mu", "foc_shift_nm", "baseline"):
            _number(key, getattr(self, key))
        lo, hi = self.bg_uniform
        _check("bg_uniform", 0 <= lo <= hi, "0 <= lo <= hi photons/px", list(self.bg_uniform))
        _check("z_range_nm", self.z_range_nm[0] <= self.z_range_nm[1], "lo <= hi nm", list(self.z_range_nm))
        _check("psf", self.psf in PSF_KINDS, f"one of {', '.join(PSF_KINDS)}", self.psf)
        if self.psf == "spline":
            if not isinstance(self.spline_calib, (str, Path)) or not str(self.spline_calib):
                raise ValueError("spline_calib must be the path of a SMAP calibration .mat for psf 'spline', "
                                 f"got {self.spline_calib!r}")
            self.spline_calib = str(self.spline_calib)
            z_lo, z_hi = load_smap_spline(self.spline_calib).z_range_nm
            if not z_lo <= self.z_range_nm[0] <= self.z_range_nm[1] <= z_hi:
                raise ValueError(f"z_range_nm {list(self.z_range_nm)} must lie within the z range "
                                 f"[{z_lo:g}, {z_hi:g}] nm of spline_calib {self.spline_calib}")
        elif self.spline_calib is not None:
            raise ValueError(f"spline_calib is only used by psf 'spline', got psf {self.psf!r}")
        _check("camera", self.camera in CAMERA_KINDS, f"one of {', '.join(CAMERA_KINDS)}", self.camera)
        _check("qe", 0 < _number("qe", self.qe) <= 1, "in (0, 1]", self.qe)
        if self.em_gain is not None:
            _check("em_gain", _number("em_gain", self.em_gain) > 0,
                   "a number > 0, or blank (null) for a camera without EM gain", self.em_gain)
        if self.camera == "emccd" and self.em_gain is None:
            raise ValueError("em_gain must be a number > 0 for camera 'emccd' (blank only for 'scmos')")
        if self.camera == "scmos" and self.em_gain is not None:
            raise ValueError("em_gain must be blank (null) for camera 'scmos', which has no EM gain, "
                             f"got {self.em_gain!r}")
        if self.read_sigma_map is not None and self.camera != "scmos":
            raise ValueError(f"read_sigma_map is only used by camera 'scmos', got camera {self.camera!r}")
        _check("max_targets", isinstance(self.max_targets, int) and self.max_targets >= 1, "an integer >= 1",
               self.max_targets)

    @classmethod
    def from_dict(cls, values: dict) -> "SimConfig":
        """Config from a flat mapping (a YAML section); unknown keys raise a ValueError listing the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"the simulation config must be a mapping of keys to values, got {type(values).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown simulation key(s) {', '.join(map(str, unknown))}; "
                             f"valid keys: {', '.join(valid)}")
        values = dict(values)
        if "emitter_density" in values and values["emitter_density"] is not None and "emitter_av" not in values:
            values["emitter_av"] = None
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain YAML-safe mapping (tuples as lists) that `from_dict` reads back to an equal config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def em_avg(self) -> float:
        """Mean number of emitters on per frame."""
        if self.emitter_av is not None:
            return float(self.emitter_av)
        area_um2 = self.img_size[0] * self.img_size[1] * self.px_size_nm[0] * self.px_size_nm[1] * 1e-6
        return float(self.emitter_density) * area_um2

    # Scaling of smlm.md §1.6 (DECODE `autoset_scaling`).
    @property
    def input_scale(self) -> float:
        return self.intensity_mu / 50.0

    @property
    def input_offset(self) -> float:
        return 0.5 * (self.bg_uniform[0] + self.bg_uniform[1])

    @property
    def phot_max(self) -> float:
        return self.intensity_mu + 8.0 * self.intensity_sig

    @property
    def z_max(self) -> float:
        # DECODE uses 1.2 * upper z; the larger |bound| is the same for the usual symmetric range and stays
        # positive for ranges below focus.
        return 1.2 * max(abs(self.z_range_nm[0]), abs(self.z_range_nm[1]), 1e-6)

    @property
    def bg_max(self) -> float:
        return 1.2 * max(self.bg_uniform[1], 1e-6)


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _check(key: str, ok: bool, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


def load_sim_config(source, section: str | None = "simulation") -> SimConfig:
    """SimConfig from a YAML file (path) or an already-loaded mapping; `section` picks one top-level key."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{path}: simulation config file not found")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        where = str(path)
    else:
        values, where = source, "config"
    if section is not None:
        if not isinstance(values, dict) or section not in values:
            raise ValueError(f"{where}: expected a top-level '{section}:' section")
        values = values[section] or {}
    try:
        return SimConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass
class Emitters:
    """Per-frame emitter table (smlm.md §7.1 EmitterSet fields), N rows, all on one device.

    frame_ix (N,) int64 0-based; xyz (N, 3) float32 (x px, y px, z nm); phot (N,) float32 photons in that
    frame; id (N,) int64, shared by the rows of one blinking emitter.
    """

    frame_ix: torch.Tensor
    xyz: torch.Tensor
    phot: torch.Tensor
    id: torch.Tensor

    def __len__(self) -> int:
        return self.frame_ix.shape[0]

    def subset(self, keep: torch.Tensor) -> "Emitters":
        return Emitters(self.frame_ix[keep], self.xyz[keep], self.phot[keep], self.id[keep])


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_loose_emitters(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None) -> dict:
    """Blinking emitters before binning (smlm.md §1.2) for a movie of frames 0 .. n_frames - 1.

    Start times are uniform over the padded time range [-3 L, n_frames + 3 L) (L = lifetime_avg frames), so the
    movie begins and ends in steady state. Each emitter is on for Exponential(mean L) and, with t0 uniform, touches
    L + 1 frames on average; the count N ~ Poisson(em_avg (n_frames + 6 L) / (L + 1)) therefore gives em_avg
    emitters per frame on average (DECODE's n_frames_plus / (L + 1)). Returns xyz (N, 3) (x, y px uniform over the
    frame extent, z nm uniform in z_range_nm), flux (N,) photons per full frame ~ Normal(mu, sig) clamped to
    intensity_th, t0 (N,) and ontime (N,) in frames, id (N,) int64.
    """
    dev, f32 = _device(generator), torch.float32
    life = cfg.lifetime_avg
    t_lo, t_hi = -3.0 * life, n_frames + 3.0 * life
    rate = torch.tensor(cfg.em_avg * (t_hi - t_lo) / (life + 1.0), dtype=torch.float64, device=dev)
    n = int(torch.poisson(rate, generator=generator).item())
    h, w = cfg.img_size
    u = torch.rand(n, 3, generator=generator, device=dev, dtype=f32)
    z_lo, z_hi = cfg.z_range_nm
    xyz = torch.stack([u[:, 0] * w - 0.5, u[:, 1] * h - 0.5, z_lo + u[:, 2] * (z_hi - z_lo)], dim=1)
    flux = (cfg.intensity_mu + cfg.intensity_sig * torch.randn(n, generator=generator, device=dev, dtype=f32)
            ).clamp_min(cfg.intensity_th)
    t0 = t_lo + (t_hi - t_lo) * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    ontime = torch.empty(n, device=dev, dtype=torch.float64).exponential_(1.0 / life, generator=generator)
    return {"xyz": xyz, "flux": flux, "t0": t0, "ontime": ontime, "id": torch.arange(n, device=dev)}


def bin_emitters(loose: dict, n_frames: int) -> Emitters:
    """Split each emitter's on-interval [t0, t0 + ontime) over the frames [k, k + 1) it overlaps, k in
    0 .. n_frames - 1, with photons = flux * overlap (smlm.md §1.2, `_distribute_framewise`). Rows are ordered
    by emitter, then frame."""
    t0, te = loose["t0"], loose["t0"] + loose["ontime"]
    first = torch.floor(t0).long()
    n_touched = (torch.ceil(te).long() - first).clamp_min(0)
    owner = torch.repeat_interleave(torch.arange(len(t0), device=t0.device), n_touched)
    starts = torch.cumsum(n_touched, 0) - n_touched
    frame = first[owner] + torch.arange(len(owner), device=t0.device) - starts[owner]
    overlap = torch.minimum(te[owner], (frame + 1).double()) - torch.maximum(t0[owner], frame.double())
    keep = (overlap > 0) & (frame >= 0) & (frame < n_frames)
    owner, frame, overlap = owner[keep], frame[keep], overlap[keep]
    phot = (loose["flux"][owner].double() * overlap).to(torch.float32)
    return Emitters(frame, loose["xyz"][owner], phot, loose["id"][owner])


def psf_sigmas(z_nm: torch.Tensor, cfg: SimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_x, sigma_y) in px at depth z_nm (smlm.md §1.3): sigma0 for "gaussian"; for "astigmatic"
    sigma_x = sigma0 sqrt(1 + ((z + foc_shift) / rl)^2), sigma_y = sigma0 sqrt(1 + ((z - foc_shift) / rl)^2).
    The spline PSF has no such widths: NaN for psf "spline", as metrics.smlm.emitter_crlb_nm gives NaN there."""
    if cfg.psf == "spline":
        s = torch.full_like(z_nm, math.nan)
        return s, s
    if cfg.psf == "gaussian":
        s = torch.full_like(z_nm, cfg.sigma0_px)
        return s, s
    sx = cfg.sigma0_px * torch.sqrt(1 + ((z_nm + cfg.foc_shift_nm) / cfg.rl_nm) ** 2)
    sy = cfg.sigma0_px * torch.sqrt(1 + ((z_nm - cfg.foc_shift_nm) / cfg.rl_nm) ** 2)
    return sx, sy


def _pixel_fraction(n_px: int, pos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(N, n_px) fraction of a 1D Gaussian (mean pos, std sigma, px) on pixels [c - 1/2, c + 1/2), c = 0 .. n_px - 1."""
    centres = torch.arange(n_px, device=pos.device, dtype=pos.dtype)
    scale = (sigma * math.sqrt(2.0))[:, None]
    lo = (centres - 0.5 - pos[:, None]) / scale
    hi = (centres + 0.5 - pos[:, None]) / scale
    # erfc differences in the tails: erf(hi) - erf(lo) cancels to 0 there in float32.
    right = torch.special.erfc(lo) - torch.special.erfc(hi)
    left = torch.special.erfc(-hi) - torch.special.erfc(-lo)
    return 0.5 * torch.where(lo > 0, right, torch.where(hi < 0, left, torch.erf(hi) - torch.erf(lo)))


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
        ex = _pixel_fraction(w, xyz[part, 0], sx)                            # (n, W)
        ey = _pixel_fraction(h, xyz[part, 1], sy) * emitters.phot[part, None].to(xyz.dtype)   # (n, H)
        img = (ey[:, :, None] * ex[:, None, :]).flatten(1)                   # (n, H*W)
        flat_ix = emitters.frame_ix[part, None] * (h * w) + pix              # (n, H*W)
        out.index_add_(0, flat_ix.flatten(), img.flatten())
    return out.view(n_frames, h, w)


def sample_background(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_frames, H, W) photons/px: one Uniform(bg_uniform) level per frame (smlm.md §1.4, `UniformBackground`)."""
    lo, hi = cfg.bg_uniform
    level = lo + (hi - lo) * torch.rand(n_frames, generator=generator, device=_device(generator))
    return level[:, None, None].expand(n_frames, *cfg.img_size).contiguous()


def _standard_gamma_int(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape, 1) for integer shapes >= 0 (Gamma(0) = 0), Marsaglia-Tsang rejection on every element at
    once. Each round accepts > 95 % of the pending draws for shape >= 1, so the loop ends after a few rounds."""
    dims, shape = shape.shape, shape.reshape(-1)
    out = torch.zeros_like(shape)
    d = shape.clamp_min(1.0) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    pending = (shape > 0).nonzero().squeeze(1)
    while pending.numel():
        x = torch.randn(pending.numel(), generator=generator, device=shape.device, dtype=shape.dtype)
        u = torch.rand(pending.numel(), generator=generator, device=shape.device, dtype=shape.dtype)
        dp, v = d[pending], (1 + c[pending] * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dp - dp * v + dp * torch.log(v.clamp_min(1e-30)))
        out[pending[ok]] = dp[ok] * v[ok]
        pending = pending[~ok]
    return out.view(dims)


def camera_forward(photons: torch.Tensor, cfg: SimConfig, generator: torch.Generator | None = None,
                   read_sigma_map: torch.Tensor | None = None) -> torch.Tensor:
    """Noisy camera frames in ADU from expected photons per pixel (any shape ending in (H, W)), smlm.md §1.5.

    emccd: Poisson(qe x + spur) e-, EM gain Gamma(shape = count, scale = em_gain), + Normal(0, read_sigma),
    / e_per_adu, floor, + baseline, clamped at 0. scmos: the same without gain; the read noise std may be a
    per-pixel (H, W) map in e-. perfect: Poisson(x) only, in photons (DECODE's PerfectCamera: qe 1, no offset,
    1 e-/ADU; the config's camera numbers are ignored). noiseless: x itself (debugging; no randomness).
    Returns float32 on photons' device.
    """
    x = photons.to(torch.float32).clamp_min(0)
    if cfg.camera == "noiseless":
        return x
    if cfg.camera == "perfect":
        return torch.poisson(x, generator=generator)
    electrons = torch.poisson(x * cfg.qe + cfg.spur_noise, generator=generator)
    if cfg.camera == "emccd":
        electrons = _standard_gamma_int(electrons, generator) * cfg.em_gain
    sigma = cfg.read_sigma if read_sigma_map is None else read_sigma_map.to(x)
    electrons = electrons + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return (torch.floor(electrons / cfg.e_per_adu) + cfg.baseline).clamp_min(0)


def to_photons(adu: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Photons from ADU with the camera's mean response (smlm.md §1.5 step 9):
    ((adu - baseline) e_per_adu / em_gain - spur) / qe, without the gain division for scmos; identity for
    perfect and noiseless. Not an exact inverse of `camera_forward` (smlm.md §10 #4): the floor to whole ADU
    loses 0.5 ADU on average, i.e. 0.5 e_per_adu / (em_gain qe) photons (0.075 at the default EMCCD; gain 1
    for scmos), which DECODE's formula keeps and so does this one."""
    if cfg.camera in ("perfect", "noiseless"):
        return adu.to(torch.float32)
    electrons = (adu.to(torch.float32) - cfg.baseline) * cfg.e_per_adu
    if cfg.em_gain is not None:
        electrons = electrons / cfg.em_gain
    return (electrons - cfg.spur_noise) / cfg.qe


def load_read_sigma_map(cfg: SimConfig) -> torch.Tensor | None:
    """The scmos per-pixel read noise (H, W) e- from cfg.read_sigma_map (.npy), or None."""
    if cfg.read_sigma_map is None:
        return None
    path = Path(cfg.read_sigma_map)
    if not path.is_file():
        raise ValueError(f"read_sigma_map: {path} not found")
    arr = np.load(path, allow_pickle=False)
    if arr.shape != tuple(cfg.img_size) or not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError(f"read_sigma_map: {path} must hold a finite, non-negative {tuple(cfg.img_size)} array, "
                         f"got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32))


@dataclass
class Movie:
    """A simulated movie: frames (T, H, W) float32 noisy photons (camera then `to_photons`), bg (T, H, W)
    photons/px, emitters the per-frame table with 0 <= frame_ix < T."""

    frames: torch.Tensor
    bg: torch.Tensor
    emitters: Emitters


def simulate_acquisition(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None,
                         read_sigma_map: torch.Tensor | None = None) -> tuple[torch.Tensor, Movie]:
    """(camera frames in ADU (T, H, W), the movie with those frames converted back to photons): a blinking-
    emitter acquisition of n_frames frames on the generator's device (smlm.md §1.2-1.5)."""
    emitters = bin_emitters(sample_loose_emitters(cfg, n_frames, generator), n_frames)
    bg = sample_background(cfg, n_frames, generator)
    adu = camera_forward(render(emitters, n_frames, cfg) + bg, cfg, generator, read_sigma_map)
    return adu, Movie(to_photons(adu, cfg), bg, emitters)


def simulate_movie(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None,
                   read_sigma_map: torch.Tensor | None = None) -> Movie:
    """A blinking-emitter movie of n_frames frames in photons on the generator's device (smlm.md §1.2-1.5)."""
    return simulate_acquisition(cfg, n_frames, generator, read_sigma_map)[1]


def scale_frames(frames: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Network input (frames - input_offset) / input_scale (smlm.md §1.6), frames in photons."""
    return (frames - cfg.input_offset) / cfg.input_scale


def is_target(emitters: Emitters, cfg: SimConfig) -> torch.Tensor:
    """(N,) bool: rows with >= label_photon_min photons inside the frame extent, the emitters the loss learns
    and the evaluation counts (smlm.md §1.2 target filter)."""
    h, w = cfg.img_size
    x, y = emitters.xyz[:, 0], emitters.xyz[:, 1]
    return (emitters.phot >= cfg.label_photon_min) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def frame_targets(emitters: Emitters, frame: int, cfg: SimConfig) -> torch.Tensor:
    """(E, 4) targets of one frame in the loss's scaled units (photons / phot_max, x px, y px, z / z_max):
    its rows that pass `is_target`."""
    keep = (emitters.frame_ix == frame) & is_target(emitters, cfg)
    if int(keep.sum()) > cfg.max_targets:
        raise ValueError(f"frame {frame} has {int(keep.sum())} target emitters, more than max_targets="
                         f"{cfg.max_targets}; raise max_targets or lower the emitter density")
    e = emitters.subset(keep)
    return torch.stack([e.phot / cfg.phot_max, e.xyz[:, 0], e.xyz[:, 1], e.xyz[:, 2] / cfg.z_max], dim=1)


def unscale_targets(targets: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Inverse of the target scaling (..., 4) -> (photons, x px, y px, z nm) (`InverseParamListRescale`)."""
    scale = targets.new_tensor([cfg.phot_max, 1.0, 1.0, cfg.z_max])
    return targets * scale


def window_indices(n_frames: int, window: int = 3) -> torch.Tensor:
    """(n_frames, window) frame indices centred on each frame, clamped at the movie ends (smlm.md §1.7)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of frames >= 1, got {window}")
    half = window // 2
    ix = torch.arange(n_frames)[:, None] + torch.arange(-half, half + 1)
    return ix.clamp(0, n_frames - 1)


def _item(frames: torch.Tensor, bg: torch.Tensor, emitters: Emitters, centre: int, cfg: SimConfig) -> dict:
    return {"frames": scale_frames(frames, cfg).to(torch.float32),
            "target_emitters": frame_targets(emitters, centre, cfg).to(torch.float32),
            "target_bg": (bg[centre] / cfg.bg_max).to(torch.float32)}


class SMLMSimDataset(Dataset):
    """Fresh simulated windows for training (module docstring). Item i of epoch e is a pure function of
    (seed, e, i), whatever the worker. Items: frames (window, H, W) scaled input; target_emitters (E_i, 4) scaled
    targets of the centre frame; target_bg (H, W) bg / bg_max; index int64. Batch with `collate_smlm`.
    Call `set_epoch` at the start of every epoch for a new movie.

    block: windows per simulated movie. The last block's movie is simulated once per process and reused
    while its items are read, so a DataLoader whose batches hold whole blocks (batch size a multiple of
    block, no shuffling) simulates each movie once. block=1 gives independent windows."""

    def __init__(self, cfg: SimConfig, length: int, seed: int = 0, window: int = 3, block: int = 16):
        if length < 1 or block < 1:
            raise ValueError(f"length and block must be >= 1 windows, got {length} and {block}")
        window_indices(1, window)
        self.cfg, self.length, self.seed, self.window, self.epoch = cfg, int(length), int(seed), int(window), 0
        self.block = int(block)
        self.read_sigma_map = load_read_sigma_map(cfg)
        self._cached: tuple[tuple[int, int], Movie] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _block_movie(self, b: int) -> Movie:
        key = (self.epoch, b)
        if self._cached is None or self._cached[0] != key:
            n_windows = min(self.block, self.length - b * self.block)
            seed = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(seed))
            self._cached = key, simulate_movie(self.cfg, n_windows + self.window - 1, gen, self.read_sigma_map)
        return self._cached[1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        b, k = divmod(int(i), self.block)
        movie = self._block_movie(b)
        item = _item(movie.frames[k:k + self.window], movie.bg, movie.emitters, k + self.window // 2, self.cfg)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


class MovieWindowDataset(Dataset):
    """Windows of a fixed movie (validation/test): item t is centred on frame t, indices clamped at the ends,
    so every frame is a target once. Same item layout as `SMLMSimDataset`."""

    def __init__(self, movie: Movie, cfg: SimConfig, window: int = 3):
        self.movie, self.cfg = movie, cfg
        self.windows = window_indices(movie.frames.shape[0], window)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, t: int) -> dict:
        ix = self.windows[t]
        item = _item(self.movie.frames[ix], self.movie.bg, self.movie.emitters, int(t), self.cfg)
        item["index"] = torch.tensor(t, dtype=torch.int64)
        return item


def collate_smlm(items: list[dict]) -> dict:
    """Batch for `gmm_loss`: frames (B, window, H, W); target_emitters (B, E, 4) zero-padded to the batch's
    largest count E (at least 1); target_mask (B, E) bool; target_bg (B, H, W); index (B,)."""
    n_max = max(1, max(item["target_emitters"].shape[0] for item in items))
    em = torch.zeros(len(items), n_max, 4)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for b, item in enumerate(items):
        n = item["target_emitters"].shape[0]
        em[b, :n], mask[b, :n] = item["target_emitters"], True
    return {"frames": torch.stack([item["frames"] for item in items]), "target_emitters": em,
            "target_mask": mask, "target_bg": torch.stack([item["target_bg"] for item in items]),
            "index": torch.stack([item["index"] for item in items])}


def write_movie_h5(path, movie: Movie, cfg: SimConfig, seed: int | None = None) -> None:
    """Store a fixed movie: /data/frames (T, H, W) photons, /data/bg (T, H, W) photons/px (gzip), /emitters/
    {frame_ix, xyz (x px, y px, z nm), phot, id}, /meta attrs: format, xy_unit "px", px_size (nm), n_frames,
    seed (-1 if unknown) and config (the full SimConfig as YAML)."""
    with h5py.File(path, "w") as f:
        meta = f.create_group("meta")
        meta.attrs.update({"format": H5_FORMAT, "xy_unit": "px", "z_unit": "nm", "photon_unit": "photons",
                           "px_size": np.asarray(cfg.px_size_nm), "n_frames": movie.frames.shape[0],
                           "seed": -1 if seed is None else int(seed),
                           "config": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
        data = f.create_group("data")
        for name in ("frames", "bg"):
            data.create_dataset(name, data=getattr(movie, name).cpu().numpy().astype(np.float32),
                                compression="gzip", chunks=True)
        em = f.create_group("emitters")
        e = movie.emitters
        for name, value in (("frame_ix", e.frame_ix), ("xyz", e.xyz), ("phot", e.phot), ("id", e.id)):
            em.create_dataset(name, data=value.cpu().numpy())


def read_movie_h5(path) -> tuple[Movie, SimConfig, dict]:
    """(movie, config, meta attrs) from a file of `write_movie_h5`; a missing or foreign file raises a
    ValueError naming it and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: movie file not found")
    try:
        with h5py.File(path, "r") as f:
            if f.get("meta") is None or f["meta"].attrs.get("format") != H5_FORMAT:
                raise ValueError(f"{path}: not a simulated SMLM movie (expected /meta attr format={H5_FORMAT!r})")
            meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f["meta"].attrs.items()}
            frames, bg = (torch.from_numpy(f["data"][k][()]) for k in ("frames", "bg"))
            em = {k: torch.from_numpy(f["emitters"][k][()]) for k in ("frame_ix", "xyz", "phot", "id")}
    except (OSError, KeyError) as e:
        raise ValueError(f"{path}: unreadable or incomplete movie file ({e})") from None
    cfg = SimConfig.from_dict(yaml.safe_load(meta["config"]))
    if frames.shape[1:] != cfg.img_size or bg.shape != frames.shape:
        raise ValueError(f"{path}: frames {tuple(frames.shape)} and bg {tuple(bg.shape)} must both be "
                         f"(T, {cfg.img_size[0]}, {cfg.img_size[1]})")
    return Movie(frames, bg, Emitters(**em)), cfg, meta


# ---------------------------------------------------------------------------- CLI

def write_tiff_movie(out, cfg: SimConfig, n_frames: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """Simulate n_frames and write what a microscope would give fit_smlm.py: `out` (.tif, uint16 ADU, one page
    per frame) and the ground truth next to it (`out` with .h5: `write_movie_h5`, frames in photons, emitters
    in px / nm, the configuration). Returns (tif, h5, summary)."""
    import tifffile

    tif = Path(out)
    if tif.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"--out {tif}: expected a .tif or .tiff file name")
    adu, movie = simulate_acquisition(cfg, n_frames, torch.Generator().manual_seed(seed), load_read_sigma_map(cfg))
    adu = adu.numpy()
    saturated = int((adu > 65535).sum())
    tif.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tif, np.clip(adu, 0, 65535).astype(np.uint16), photometric="minisblack")
    h5 = tif.with_suffix(".h5")
    write_movie_h5(h5, movie, cfg, seed=seed)
    return tif, h5, {"frames": n_frames, "emitters": len(movie.emitters), "saturated_pixels": saturated}


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m data.smlm", description="SMLM simulator tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("tiff", help="simulate a TIFF stack in ADU (input of fit_smlm.py) and its ground truth")
    p.add_argument("--sim_config", required=True, help="YAML with a simulation: section, e.g. a preset or "
                                                      "<run>/simulation.yaml")
    p.add_argument("--frames", type=int, default=1000, help="frames to simulate")
    p.add_argument("--img_size", default=None, help="H,W px (default: the config's)")
    p.add_argument("--emitter_density", type=float, default=None,
                   help="emitters per um^2 per frame (default: the config's emitter_av / emitter_density)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .tif; the ground truth goes to the same name with .h5")
    args = parser.parse_args(argv)

    def fail(message: str):
        sys.stderr.write(f"data.smlm: error: {message}\n")
        raise SystemExit(2)

    if args.frames < 1:
        fail(f"--frames must be >= 1, got {args.frames}")
    try:
        cfg = load_sim_config(args.sim_config)
        changes = {}
        if args.img_size is not None:
            try:
                h, w = (int(v) for v in args.img_size.split(","))
            except ValueError:
                fail(f"--img_size {args.img_size!r}: expected H,W, e.g. 64,64")
            changes["img_size"] = (h, w)
        if args.emitter_density is not None:
            changes.update(emitter_density=args.emitter_density, emitter_av=None)
        cfg = dataclasses.replace(cfg, **changes) if changes else cfg
        tif, h5, info = write_tiff_movie(args.out, cfg, args.frames, args.seed)
    except ValueError as e:
        fail(str(e))
    print(f"{tif}: {info['frames']} frames of {cfg.img_size[0]}x{cfg.img_size[1]} px in ADU ({cfg.camera}), "
          f"{info['emitters']} emitter-frames, {cfg.em_avg:.1f} emitters/frame on average"
          + (f", {info['saturated_pixels']} pixels clipped at 65535" if info["saturated_pixels"] else ""))
    print(f"{h5}: ground truth (data.smlm.read_movie_h5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
