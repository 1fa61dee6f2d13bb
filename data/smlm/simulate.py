"""Blinking emitters and whole simulated movies (smlm.md §1.2-1.5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .camera import camera_forward, load_read_sigma_map, read_noise_window, sample_background, to_photons
from .config import SimConfig
from .psf import render


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



@dataclass
class Movie:
    """A simulated movie: frames (T, H, W) float32 noisy photons (camera then `to_photons`), bg (T, H, W)
    photons/px, emitters the per-frame table with 0 <= frame_ix < T; sensor_origin (row, col) of the frames on
    an sCMOS read-noise map (None without one)."""

    frames: torch.Tensor
    bg: torch.Tensor
    emitters: Emitters
    sensor_origin: tuple[int, int] | None = None


def simulate_acquisition(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None,
                         read_sigma_map: torch.Tensor | None = None) -> tuple[torch.Tensor, Movie]:
    """(camera frames in ADU (T, H, W), the movie with those frames converted back to photons): a blinking-
    emitter acquisition of n_frames frames on the generator's device (smlm.md §1.2-1.5). An sCMOS read-noise
    map (the sensor's, `read_sigma_map`, else loaded from cfg.read_sigma_map) is used at the frames' window
    (`read_noise_window`: cfg.sensor_origin, else a random place drawn after the emitters and background)."""
    emitters = bin_emitters(sample_loose_emitters(cfg, n_frames, generator), n_frames)
    bg = sample_background(cfg, n_frames, generator)
    sensor = read_sigma_map if read_sigma_map is not None else load_read_sigma_map(cfg)
    window, origin = read_noise_window(sensor, cfg, generator) if sensor is not None else (None, None)
    adu = camera_forward(render(emitters, n_frames, cfg) + bg, cfg, generator, window)
    return adu, Movie(to_photons(adu, cfg), bg, emitters, origin)


def simulate_movie(cfg: SimConfig, n_frames: int, generator: torch.Generator | None = None,
                   read_sigma_map: torch.Tensor | None = None) -> Movie:
    """A blinking-emitter movie of n_frames frames in photons on the generator's device (smlm.md §1.2-1.5);
    read_sigma_map as for `simulate_acquisition`."""
    return simulate_acquisition(cfg, n_frames, generator, read_sigma_map)[1]

