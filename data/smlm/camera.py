"""Background and camera (smlm.md §1.4-1.5): expected photons -> noisy ADU frames, and ADU back to photons."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .config import SimConfig

# Excess noise factor F^2 of an EMCCD at high gain: the Gamma gain stage doubles the variance of the photon
# counts, so likelihood fits and Fisher information treat counts / F^2 as Poisson (Mortensen et al. 2010).
EMCCD_EXCESS_NOISE = 2.0


def counted_qe(cfg: SimConfig) -> float:
    """The quantum efficiency the camera model applies: cfg.qe, or 1 for the perfect and noiseless cameras,
    which count photons and ignore the config's camera numbers (`camera_forward`)."""
    return 1.0 if cfg.camera in ("perfect", "noiseless") else cfg.qe


def excess_noise(cfg: SimConfig) -> float:
    """F^2 of cfg's camera: EMCCD_EXCESS_NOISE for "emccd", 1 for the cameras without EM gain."""
    return EMCCD_EXCESS_NOISE if cfg.camera == "emccd" else 1.0


def sample_background(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_frames, H, W) photons/px: one Uniform(bg_uniform) level per frame (smlm.md §1.4, `UniformBackground`)."""
    lo, hi = cfg.bg_uniform
    device = generator.device if generator is not None else torch.device("cpu")
    level = lo + (hi - lo) * torch.rand(n_frames, generator=generator, device=device)
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


def background_std_photons(bg, cfg: SimConfig, read_sigma=None) -> np.ndarray:
    """Noise std of one pixel of background bg (photons/px, the unit of `to_photons`) after `to_photons`,
    from the camera model: sqrt(F^2 (qe bg + spur) + (read_sigma^2 + e_per_adu^2 / 12) / g^2) / qe, with F^2
    the excess noise (2 for emccd), g the EM gain (1 for scmos) and e_per_adu^2 / 12 the rounding to whole
    ADU; sqrt(bg) for the perfect camera, 0 for noiseless. read_sigma (e-, scalar or per value of bg)
    replaces the camera's read noise, which is cfg.read_sigma, or the root mean square of the map of an sCMOS
    with cfg.read_sigma_map (of its window at cfg.sensor_origin when set; the map replaces read_sigma in the
    simulation too). This is what a fitter that measures the spread of the background around a spot in
    photons (ThunderSTORM's bkgstd) sees."""
    bg = np.clip(np.asarray(bg, dtype=np.float64), 0.0, None)
    if cfg.camera == "noiseless":
        return np.zeros_like(bg)
    if cfg.camera == "perfect":
        return np.sqrt(bg)
    if read_sigma is not None:
        read = np.asarray(read_sigma, dtype=np.float64)
    elif cfg.camera == "scmos" and cfg.read_sigma_map is not None:
        sensor = load_read_sigma_map(cfg)
        if cfg.sensor_origin is not None:
            sensor = read_noise_window(sensor, cfg)[0]
        read = float(torch.sqrt(torch.mean(sensor.double() ** 2)))
    else:
        read = cfg.read_sigma
    gain = cfg.em_gain if cfg.camera == "emccd" else 1.0
    electrons_var = excess_noise(cfg) * (cfg.qe * bg + cfg.spur_noise) + (read**2 + cfg.e_per_adu**2 / 12) / gain**2
    return np.sqrt(electrons_var) / cfg.qe


def load_read_sigma_map(cfg: SimConfig) -> torch.Tensor | None:
    """The sCMOS read noise (e-) of the whole sensor from cfg.read_sigma_map (.npy), or None without a map.
    The map may be larger than the frames (a calibration of the full chip, frames recorded in a region of
    interest); `read_noise_window` picks the frames' part of it."""
    if cfg.read_sigma_map is None:
        return None
    path = Path(cfg.read_sigma_map)
    if not path.is_file():
        raise ValueError(f"read_sigma_map: {path} not found")
    arr = np.load(path, allow_pickle=False)
    h, w = cfg.img_size
    if (arr.ndim != 2 or arr.shape[0] < h or arr.shape[1] < w or not np.all(np.isfinite(arr))
            or arr.min() < 0):
        raise ValueError(f"read_sigma_map: {path} must hold a finite, non-negative 2-D array of at least the "
                         f"frame size {h}x{w}, got shape {arr.shape}")
    if cfg.sensor_origin is not None:
        r, c = cfg.sensor_origin
        if r + h > arr.shape[0] or c + w > arr.shape[1]:
            raise ValueError(f"sensor_origin {list(cfg.sensor_origin)}: {h}x{w} frames there do not fit on the "
                             f"{arr.shape[0]}x{arr.shape[1]} read_sigma_map {path}")
    return torch.from_numpy(arr.astype(np.float32))


def read_noise_window(sensor: torch.Tensor, cfg: SimConfig, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
    """((H, W) read noise of the frames, (row, col) of their origin on the sensor): the window of the sensor
    map at cfg.sensor_origin; without one, the whole map when it is the frame size, else a window at an origin
    drawn from `generator` (a new place on the chip for every simulated movie, as DECODE crops its training
    frames from a full-chip map, so that a network learns the map's statistics rather than its pixels)."""
    h, w = cfg.img_size
    if cfg.sensor_origin is not None:
        r, c = cfg.sensor_origin
    elif sensor.shape == (h, w):
        r, c = 0, 0
    else:
        device = generator.device if generator is not None else torch.device("cpu")
        r = int(torch.randint(sensor.shape[0] - h + 1, (1,), generator=generator, device=device))
        c = int(torch.randint(sensor.shape[1] - w + 1, (1,), generator=generator, device=device))
    return sensor[r:r + h, c:c + w], (r, c)


def frame_read_sigma(cfg: SimConfig, sensor_origin: tuple[int, int] | None = None) -> torch.Tensor | None:
    """(H, W) read noise (e-) of frames recorded at a known place on the sensor (`sensor_origin`, else
    cfg.sensor_origin), for fitters and bounds that weight pixels by it; None without a map. A map larger than
    the frames needs that place."""
    sensor = load_read_sigma_map(cfg)
    if sensor is None:
        return None
    if sensor_origin is not None:
        cfg = dataclasses.replace(cfg, sensor_origin=tuple(sensor_origin))
        load_read_sigma_map(cfg)  # checks that the frames fit there
    if cfg.sensor_origin is None and sensor.shape != tuple(cfg.img_size):
        raise ValueError(f"read_sigma_map {cfg.read_sigma_map} is {sensor.shape[0]}x{sensor.shape[1]}, larger "
                         f"than the {cfg.img_size[0]}x{cfg.img_size[1]} frames: set sensor_origin [row, col], "
                         "the frames' place on the sensor")
    return read_noise_window(sensor, cfg)[0]


def read_noise_variance(cfg: SimConfig, sensor_origin: tuple[int, int] | None = None) -> float | torch.Tensor:
    """Read-noise variance per pixel in e-^2 of an sCMOS, read noise plus the rounding to whole ADU
    (e_per_adu^2 / 12): (H, W) with a map (`frame_read_sigma`), else a scalar. Likelihoods and bounds add it to
    each pixel's expected electrons (the Poisson-equivalent sCMOS model of Huang et al. 2013). 0 for the other
    cameras: an EMCCD's read noise over its gain squared is ~0.06 e-^2 at the defaults, negligible next to
    the shot noise of any background."""
    if cfg.camera != "scmos":
        return 0.0
    window = frame_read_sigma(cfg, sensor_origin)
    rounding = cfg.e_per_adu**2 / 12
    return cfg.read_sigma**2 + rounding if window is None else window.double() ** 2 + rounding


def synthetic_read_sigma_map(shape: tuple[int, int], median_e: float = 1.6, spread: float = 0.3,
                             hot_fraction: float = 0.005, hot_factor: tuple[float, float] = (3.0, 10.0),
                             seed: int = 0) -> np.ndarray:
    """A plausible sCMOS read-noise map (e- rms per pixel) for trying the sCMOS route without a calibration:
    log-normal around `median_e` (log std `spread`: pixel-to-pixel amplifier differences) with a fraction of
    hot pixels `hot_factor` times noisier (random telegraph noise), as published maps of scientific CMOS
    chips look (median 1-2 e-, a long tail). Deterministic by seed."""
    rng = np.random.default_rng(seed)
    sigma = median_e * np.exp(spread * rng.standard_normal(shape))
    hot = rng.random(shape) < hot_fraction
    sigma[hot] *= rng.uniform(*hot_factor, size=int(hot.sum()))
    return sigma.astype(np.float32)
