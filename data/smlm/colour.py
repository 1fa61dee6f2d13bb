"""Two-colour ratiometric SMLM (smlm.md §7.3, §11): one emitter set imaged in two spectral channels at once.

Physics. Every emitter belongs to one of K dyes (`dyes`, K = 2 by default). A dye has a ratio distribution:
an emitter of dye k gets its own ratio r ~ Normal(ratio_mean_k, ratio_spread_k) clipped to [0, 1] (fixed for
the emitter's life), and of the N photons it emits in a frame, channel 1 receives r N and channel 2 (1 - r) N.
Positions, blinking, z and the total photons N come from `channel1` (its emitter keys: EMITTER_KEYS); each
channel has its own PSF, camera and background (`channel2` repeats channel1 except the keys it sets, and may
not set emitter keys). Channel 2 may sit on its camera with a small affine transform (`registration`: shift,
rotation about the frame centre, scale), which the simulator applies to the emitters it renders there.

Coordinates. Everything the network and the metrics see is on channel 1's pixel grid: channel 2's frames are
resampled onto it (`register_channel2`, bilinear, from the registration the user calibrated) before the
network, in training and in fitting, so that one pixel is one place in both channels. Pixel conventions,
units (photons reaching the camera, nm, frames) are data/smlm/__init__.py's.

    ColourConfig, load_colour_config    the two channels, the dyes, the registration and the curriculum
    Registration                        channel-1 px <-> channel-2 px, and resampling channel 2 onto channel 1
    simulate_colour_acquisition         ADU of both cameras and the ColourMovie (photons)
    ColourSimDataset / ColourMovieWindowDataset / collate_colour    training and validation items
    colour_targets, colour_ground_truth per-frame loss targets and the whole movie's table for the metrics
    write_colour_h5 / read_colour_h5    the design notes' layout {mode}/channel{1,2}/{images,targets,photons}
    read_colour_tiff                    two TIFF files, or one stack with a channel axis, for fitting

Curriculum (`curriculum:` in the simulation section): a list of stages {until_step: U, key: value, ...}; stage
s holds for updates [U_{s-1}, U_s) and overrides the simulation keys CURRICULUM_KEYS of both channels (density,
photons, background, z range); after the last stage the configuration itself holds. The input and target
scales stay those of the configuration, so the network's units never change between stages.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset

from .camera import camera_forward, sample_background, to_photons
from .config import SimConfig
from .dataset import scale_frames, window_indices
from .psf import render
from .simulate import Emitters, bin_emitters, sample_loose_emitters

# Keys of the emitters themselves: set in channel1 only, shared by both channels.
EMITTER_KEYS = ("img_size", "px_size_nm", "emitter_av", "emitter_density", "lifetime_avg", "intensity_mu",
                "intensity_sig", "intensity_th", "z_range_nm", "label_photon_min", "max_targets")
# Keys a curriculum stage may change (applied to both channels; bg_uniform may differ per channel only in the
# configuration itself).
CURRICULUM_KEYS = ("emitter_av", "emitter_density", "intensity_mu", "intensity_sig", "bg_uniform", "z_range_nm")
H5_FORMAT = "smlm-colour-movie-1"


def _one_line_error(e: Exception) -> str:
    return " ".join(str(e).split())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Registration:
    """Channel 2's pixel grid relative to channel 1's: x2 = scale R(rotation) (x1 - c) + c + shift, x = (x, y)
    px (pixel centres at integers, y down the image), c = centre_px. A ColourConfig sets centre_px to the
    centre ((W - 1) / 2, (H - 1) / 2) of its img_size when it is not given, so the transform stays the same
    for frames of any size (a fitted stack larger than the training frames)."""

    shift_px: tuple[float, float] = (0.0, 0.0)   # (dx, dy) px
    rotation_deg: float = 0.0                     # from +x towards +y (clockwise on screen, y pointing down), degrees
    scale: float = 1.0                            # channel-2 px per channel-1 px
    centre_px: tuple[float, float] | None = None  # (x, y) px that rotation and scale keep fixed

    def __post_init__(self):
        s = self.shift_px
        if not isinstance(s, (list, tuple)) or len(s) != 2 or not all(_finite(v) for v in s):
            raise ValueError(f"registration shift_px must be two finite numbers [dx, dy] px, got {s!r}")
        self.shift_px = (float(s[0]), float(s[1]))
        if not _finite(self.rotation_deg) or abs(self.rotation_deg) > 45:
            raise ValueError(f"registration rotation_deg must be a number within [-45, 45], got {self.rotation_deg!r}")
        if not _finite(self.scale) or not 0.5 <= self.scale <= 2:
            raise ValueError(f"registration scale must be a number within [0.5, 2], got {self.scale!r}")
        self.rotation_deg, self.scale = float(self.rotation_deg), float(self.scale)
        c = self.centre_px
        if c is not None:
            if not isinstance(c, (list, tuple)) or len(c) != 2 or not all(_finite(v) for v in c):
                raise ValueError(f"registration centre_px must be two finite numbers [x, y] px, got {c!r}")
            self.centre_px = (float(c[0]), float(c[1]))

    @property
    def is_identity(self) -> bool:
        return self.shift_px == (0.0, 0.0) and self.rotation_deg == 0.0 and self.scale == 1.0

    def _matrix(self) -> torch.Tensor:
        a = math.radians(self.rotation_deg)
        return self.scale * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                                         dtype=torch.float64)

    def _centre(self, img_size: tuple[int, int] | None) -> torch.Tensor:
        if self.centre_px is not None:
            return torch.tensor(self.centre_px, dtype=torch.float64)
        if img_size is None:
            raise ValueError("registration: centre_px is not set; pass the frame size")
        h, w = img_size
        return torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)

    def to_channel2(self, xy: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, 2) channel-1 (x, y) px -> channel-2 px (same dtype and device); img_size gives the centre when
        centre_px is not set."""
        c = self._centre(img_size)
        out = (xy.double().cpu() - c) @ self._matrix().T + c + torch.tensor(self.shift_px, dtype=torch.float64)
        return out.to(xy)

    def to_channel1(self, xy: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, 2) channel-2 (x, y) px -> channel-1 px: the inverse of `to_channel2`."""
        c = self._centre(img_size)
        shifted = xy.double().cpu() - c - torch.tensor(self.shift_px, dtype=torch.float64)
        return (shifted @ torch.linalg.inv(self._matrix()).T + c).to(xy)


def register_channel2(frames: torch.Tensor, reg: Registration) -> torch.Tensor:
    """Channel-2 images (..., H, W) resampled onto channel 1's grid: the value at channel-1 pixel (x1, y1) is
    channel 2's bilinear interpolation at reg.to_channel2(x1, y1); outside channel 2's frame the nearest edge
    pixel is used (no dark borders for the network to learn). The identity returns `frames` unchanged."""
    if reg.is_identity:
        return frames
    h, w = frames.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    xy2 = reg.to_channel2(torch.stack([xx.flatten(), yy.flatten()], 1), (h, w))
    # grid_sample's align_corners=True maps -1 and 1 to the centres of the first and last pixels.
    grid = torch.stack([2 * xy2[:, 0] / max(w - 1, 1) - 1, 2 * xy2[:, 1] / max(h - 1, 1) - 1], 1)
    grid = grid.view(1, h, w, 2).to(frames.device, torch.float32)
    flat = frames.reshape(-1, 1, h, w).to(torch.float32)
    out = F.grid_sample(flat, grid.expand(flat.shape[0], h, w, 2), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.view(frames.shape).to(frames.dtype)


@dataclass
class Dye:
    ratio_mean: float          # mean fraction of the photons in channel 1
    ratio_spread: float        # std of the per-emitter ratio
    fraction: float = 1.0      # relative abundance (normalised over the dyes)

    def __post_init__(self):
        if not _finite(self.ratio_mean) or not 0 <= self.ratio_mean <= 1:
            raise ValueError(f"dye ratio_mean must be in [0, 1], got {self.ratio_mean!r}")
        if not _finite(self.ratio_spread) or self.ratio_spread < 0:
            raise ValueError(f"dye ratio_spread must be a number >= 0, got {self.ratio_spread!r}")
        if not _finite(self.fraction) or self.fraction <= 0:
            raise ValueError(f"dye fraction must be a number > 0, got {self.fraction!r}")
        self.ratio_mean, self.ratio_spread, self.fraction = map(float, (self.ratio_mean, self.ratio_spread,
                                                                        self.fraction))


@dataclass
class ColourConfig:
    """Both channels' SimConfigs, the dyes, the registration of channel 2 and the curriculum stages."""

    channel1: SimConfig = field(default_factory=SimConfig)
    channel2: SimConfig = field(default_factory=SimConfig)
    dyes: tuple[Dye, ...] = (Dye(0.3, 0.05), Dye(0.7, 0.05))
    registration: Registration = field(default_factory=Registration)
    curriculum: tuple[dict, ...] = ()

    def __post_init__(self):
        if self.registration.centre_px is None:
            h, w = self.channel1.img_size
            self.registration = dataclasses.replace(self.registration, centre_px=((w - 1) / 2, (h - 1) / 2))
        if len(self.dyes) < 1:
            raise ValueError("dyes must list at least one dye")
        for key in EMITTER_KEYS:
            if getattr(self.channel1, key) != getattr(self.channel2, key):
                raise ValueError(f"channel2 must not set {key}: the emitters (and so {key}) are channel1's")
        for c, ch in ((1, self.channel1), (2, self.channel2)):
            if ch.read_sigma_map is not None:
                raise ValueError(f"channel{c}: read_sigma_map is not supported by the two-colour simulator; "
                                 "give the scalar read_sigma")
        last = 0
        for i, stage in enumerate(self.curriculum):
            if (not isinstance(stage, dict) or not isinstance(stage.get("until_step"), int)
                or isinstance(stage.get("until_step"), bool)):
                raise ValueError(f"curriculum stage {i}: expected a mapping with an integer until_step, got {stage!r}")
            unknown = sorted(set(stage) - {"until_step", *CURRICULUM_KEYS})
            if unknown:
                raise ValueError(f"curriculum stage {i}: unknown key(s) {', '.join(unknown)}; valid keys: "
                                 f"until_step, {', '.join(CURRICULUM_KEYS)}")
            if stage["until_step"] <= last:
                raise ValueError(f"curriculum stage {i}: until_step must increase and be > 0, got "
                                 f"{stage['until_step']} after {last}")
            last = stage["until_step"]
            self.stage_config(i)   # validates the stage's values now, not at its first update

    @property
    def channels(self) -> tuple[SimConfig, SimConfig]:
        return self.channel1, self.channel2

    @property
    def img_size(self) -> tuple[int, int]:
        return self.channel1.img_size

    @property
    def dye_means(self) -> np.ndarray:
        return np.array([d.ratio_mean for d in self.dyes])

    @property
    def dye_spreads(self) -> np.ndarray:
        return np.array([d.ratio_spread for d in self.dyes])

    @property
    def dye_priors(self) -> np.ndarray:
        f = np.array([d.fraction for d in self.dyes])
        return f / f.sum()

    def stage_at(self, step: int) -> int:
        """Curriculum stage of update `step` (0-based); len(curriculum) = the configuration itself."""
        for i, stage in enumerate(self.curriculum):
            if step < stage["until_step"]:
                return i
        return len(self.curriculum)

    def stage_config(self, stage: int) -> "ColourConfig":
        """The configuration that simulates stage `stage` (its overrides on both channels; no curriculum)."""
        if stage >= len(self.curriculum):
            return dataclasses.replace(self, curriculum=())
        values = {k: v for k, v in self.curriculum[stage].items() if k != "until_step"}
        if "emitter_density" in values and "emitter_av" not in values:
            values["emitter_av"] = None
        if "emitter_av" in values and "emitter_density" not in values:
            values["emitter_density"] = None
        try:
            ch1, ch2 = (dataclasses.replace(ch, **values) for ch in self.channels)
        except ValueError as e:
            raise ValueError(f"curriculum stage {stage}: {e}") from None
        # The network's scales are the configuration's: a stage must stay inside their ranges.
        base = self.channel1
        if ch1.intensity_mu + 3 * ch1.intensity_sig > base.phot_max:
            raise ValueError(f"curriculum stage {stage}: intensity_mu + 3 intensity_sig must stay below the "
                             f"configuration's phot_max {base.phot_max:g} photons")
        if max(abs(z) for z in ch1.z_range_nm) > max(abs(z) for z in base.z_range_nm):
            raise ValueError(f"curriculum stage {stage}: z_range_nm must lie within the configuration's "
                             f"{list(base.z_range_nm)}")
        for c, (new, old) in enumerate(zip((ch1, ch2), self.channels)):
            if new.bg_uniform[1] > old.bg_max:
                raise ValueError(f"curriculum stage {stage}: bg_uniform of channel{c + 1} must stay below its "
                                 f"bg_max {old.bg_max:g} photons/px")
        return dataclasses.replace(self, channel1=ch1, channel2=ch2, curriculum=())

    @classmethod
    def from_dict(cls, values: dict) -> "ColourConfig":
        """From the YAML `simulation:` mapping: channel1 (SimConfig keys), channel2 (only the keys that differ),
        dyes (list of {ratio_mean, ratio_spread, fraction}), registration ({shift_px, rotation_deg, scale}),
        curriculum (list of stages). Unknown keys raise a ValueError listing the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"the simulation config must be a mapping, got {type(values).__name__}")
        valid = ("channel1", "channel2", "dyes", "registration", "curriculum")
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown two-colour simulation key(s) {', '.join(map(str, unknown))}; valid keys: "
                             f"{', '.join(valid)}")
        ch1_values = values.get("channel1") or {}
        ch2_values = values.get("channel2") or {}
        if not isinstance(ch1_values, dict) or not isinstance(ch2_values, dict):
            raise ValueError("channel1 and channel2 must be mappings of SimConfig keys")
        shared = sorted(set(ch2_values) & set(EMITTER_KEYS))
        if shared:
            raise ValueError(f"channel2 must not set {', '.join(shared)}: the emitters are channel1's "
                             f"(keys {', '.join(EMITTER_KEYS)})")
        try:
            ch1 = SimConfig.from_dict(ch1_values)
        except ValueError as e:
            raise ValueError(f"channel1: {e}") from None
        try:
            ch2 = SimConfig.from_dict({**ch1.to_dict(), **ch2_values})
        except ValueError as e:
            raise ValueError(f"channel2: {e}") from None
        kwargs = {"channel1": ch1, "channel2": ch2}
        if values.get("dyes") is not None:
            dyes = values["dyes"]
            if not isinstance(dyes, list) or not all(isinstance(d, dict) for d in dyes):
                raise ValueError("dyes must be a list of {ratio_mean, ratio_spread, fraction} mappings")
            try:
                kwargs["dyes"] = tuple(Dye(**d) for d in dyes)
            except TypeError as e:
                raise ValueError(f"dyes: {e}") from None
        if values.get("registration") is not None:
            try:
                kwargs["registration"] = Registration(**values["registration"])
            except TypeError as e:
                raise ValueError(f"registration: {e}") from None
        if values.get("curriculum") is not None:
            if not isinstance(values["curriculum"], list):
                raise ValueError("curriculum must be a list of stages {until_step: N, key: value}")
            kwargs["curriculum"] = tuple(dict(s) if isinstance(s, dict) else s for s in values["curriculum"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """YAML-safe mapping that `from_dict` reads back to an equal config (channel2 written in full)."""
        ch2 = {k: v for k, v in self.channel2.to_dict().items() if k not in EMITTER_KEYS}
        reg = dataclasses.asdict(self.registration)
        reg["shift_px"], reg["centre_px"] = list(reg["shift_px"]), list(reg["centre_px"])
        return {"channel1": self.channel1.to_dict(), "channel2": ch2,
                "dyes": [dataclasses.asdict(d) for d in self.dyes], "registration": reg,
                "curriculum": [dict(s) for s in self.curriculum]}


def load_colour_config(source, section: str | None = "simulation") -> ColourConfig:
    """ColourConfig from a YAML file (path) or a loaded mapping; `section` picks one top-level key."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{path}: simulation config file not found")
        values, where = yaml.safe_load(path.read_text()) or {}, str(path)
    else:
        values, where = source, "config"
    if section is not None:
        if not isinstance(values, dict) or section not in values:
            raise ValueError(f"{where}: expected a top-level '{section}:' section")
        values = values[section] or {}
    try:
        return ColourConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass
class ColourMovie:
    """frames, bg (2, T, H, W) photons (channel 2 on its own camera grid, as recorded); emitters: the frame
    table on channel 1's grid with the total photons N; dye (rows,) int64 and ratio (rows,) float32 of each
    row's emitter (channel 1 got ratio x N of the row's photons)."""

    frames: torch.Tensor
    bg: torch.Tensor
    emitters: Emitters
    dye: torch.Tensor
    ratio: torch.Tensor

    def channel_emitters(self, c: int, cfg: ColourConfig, grid: str = "camera") -> Emitters:
        """Channel c's (0 or 1) emitters with that channel's photons; grid "camera": channel 2's positions on
        its own camera (where it was rendered), "channel1": on channel 1's grid."""
        share = self.ratio if c == 0 else 1 - self.ratio
        e = self.emitters
        xyz = e.xyz
        if c == 1 and grid == "camera" and not cfg.registration.is_identity:
            xyz = torch.cat([cfg.registration.to_channel2(xyz[:, :2], cfg.img_size), xyz[:, 2:]], 1)
        return Emitters(e.frame_ix, xyz, e.phot * share, e.id)


def simulate_colour_acquisition(cfg: ColourConfig, n_frames: int, generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, ColourMovie]:
    """(ADU of both cameras (2, T, H, W), the movie in photons): one blinking emitter set (channel1's keys),
    a dye per emitter by the dyes' fractions, its ratio ~ Normal(dye mean, dye spread) clipped to [0, 1], then
    each channel rendered with its PSF, background and camera (channel 2 at the registration's positions)."""
    loose = sample_loose_emitters(cfg.channel1, n_frames, generator)
    n = len(loose["id"])
    dev = loose["xyz"].device
    priors = torch.as_tensor(cfg.dye_priors, dtype=torch.float64, device=dev)
    dye = (torch.multinomial(priors, n, replacement=True, generator=generator) if n else
           torch.zeros(0, dtype=torch.int64, device=dev))
    means = torch.as_tensor(cfg.dye_means, dtype=torch.float32, device=dev)[dye]
    spreads = torch.as_tensor(cfg.dye_spreads, dtype=torch.float32, device=dev)[dye]
    ratio = (means + spreads * torch.randn(n, generator=generator, device=dev)).clamp(0, 1)
    emitters = bin_emitters(loose, n_frames)
    movie = ColourMovie(torch.empty(0), torch.empty(0), emitters, dye[emitters.id], ratio[emitters.id])
    adu, frames, bgs = [], [], []
    for c, ch in enumerate(cfg.channels):
        bg = sample_background(ch, n_frames, generator)
        counts = camera_forward(render(movie.channel_emitters(c, cfg), n_frames, ch) + bg, ch, generator)
        adu.append(counts)
        frames.append(to_photons(counts, ch))
        bgs.append(bg)
    movie.frames, movie.bg = torch.stack(frames), torch.stack(bgs)
    return torch.stack(adu), movie


def simulate_colour_movie(cfg: ColourConfig, n_frames: int, generator: torch.Generator | None = None) -> ColourMovie:
    return simulate_colour_acquisition(cfg, n_frames, generator)[1]


def scale_colour_frames(frames: torch.Tensor, cfg: ColourConfig) -> torch.Tensor:
    """(2, ..., H, W) photons on channel 1's grid -> the network input, each channel scaled by its own config."""
    return torch.stack([scale_frames(frames[c], ch) for c, ch in enumerate(cfg.channels)])


def _is_target(movie: ColourMovie, cfg: ColourConfig) -> torch.Tensor:
    """(rows,) bool: inside channel 1's frame with >= label_photon_min photons in at least one channel."""
    e, (h, w), floor = movie.emitters, cfg.img_size, cfg.channel1.label_photon_min
    x, y = e.xyz[:, 0], e.xyz[:, 1]
    brightest = e.phot * torch.maximum(movie.ratio, 1 - movie.ratio)
    return (brightest >= floor) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def colour_targets(movie: ColourMovie, frame: int, cfg: ColourConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 6) targets of one frame on channel 1's grid, (phot1 / phot_max, phot2 / phot_max, x px, y px,
    z / z_max, ratio), and the (2, E) bool channel mask. A row is a target of channel c when that channel got
    >= label_photon_min of the emitter's photons in the frame; rows: the frame's emitters inside the frame that
    are a target of at least one channel (`_is_target`). phot_max and z_max are channel 1's (the shared
    emitter keys)."""
    ch1 = cfg.channel1
    e = movie.emitters
    keep = (e.frame_ix == frame) & _is_target(movie, cfg)
    if int(keep.sum()) > ch1.max_targets:
        raise ValueError(f"frame {frame} has {int(keep.sum())} target emitters, more than max_targets="
                         f"{ch1.max_targets}; raise max_targets or lower the emitter density")
    phot, r, xyz = e.phot[keep], movie.ratio[keep], e.xyz[keep]
    ph1, ph2 = phot * r, phot * (1 - r)
    rows = torch.stack([ph1 / ch1.phot_max, ph2 / ch1.phot_max, xyz[:, 0], xyz[:, 1], xyz[:, 2] / ch1.z_max, r], 1)
    return rows.to(torch.float32), torch.stack([ph1 >= ch1.label_photon_min, ph2 >= ch1.label_photon_min])


def colour_ground_truth(movie: ColourMovie, cfg: ColourConfig) -> dict:
    """The movie's target emitters (the rows of `colour_targets` over all frames) as numpy arrays for the
    metrics: frame_ix (N,), xyz_px (N, 3) (x, y px on channel 1's grid, z nm), xyz_nm (N, 3), phot (N,) total
    photons, phot_ch (N, 2), ratio (N,), dye (N,) int64, channel_mask (N, 2) bool (a target of that channel)."""
    ch1, e = cfg.channel1, movie.emitters
    keep = _is_target(movie, cfg)
    phot, ratio = e.phot[keep].double(), movie.ratio[keep].double()
    phot_ch = torch.stack([phot * ratio, phot * (1 - ratio)], 1)
    xyz = e.xyz[keep].double()
    return {"frame_ix": e.frame_ix[keep].numpy(), "xyz_px": xyz.numpy(),
            "xyz_nm": (xyz * torch.tensor([*ch1.px_size_nm, 1.0], dtype=torch.float64)).numpy(),
            "phot": phot.numpy(), "phot_ch": phot_ch.numpy(), "ratio": ratio.numpy(),
            "dye": movie.dye[keep].numpy(), "channel_mask": (phot_ch >= ch1.label_photon_min).numpy()}


def _colour_item(frames: torch.Tensor, bg: torch.Tensor, movie: ColourMovie, centre: int,
                 scale_cfg: ColourConfig) -> dict:
    """One training item; `scale_cfg` (the run's configuration, not a curriculum stage's) gives every scale."""
    rows, channel_mask = colour_targets(movie, centre, scale_cfg)
    return {"frames": scale_colour_frames(frames, scale_cfg).to(torch.float32), "target_emitters": rows,
            "channel_mask": channel_mask,
            "target_bg": torch.stack([bg[c] / ch.bg_max for c, ch in enumerate(scale_cfg.channels)]).float()}


class ColourSimDataset(Dataset):
    """Fresh simulated two-colour windows for training, as `data.smlm.SMLMSimDataset`: item i of epoch e is a
    pure function of (seed, e, i, stage); blocks of `block` windows share one movie. Items: frames (2, window,
    H, W) registered and scaled; target_emitters (E, 6), channel_mask (2, E), target_bg (2, H, W); index.
    `cfg` gives the scales; `set_stage(s)` simulates curriculum stage s of it (call with `set_epoch`)."""

    def __init__(self, cfg: ColourConfig, length: int, seed: int = 0, window: int = 3, block: int = 16):
        if length < 1 or block < 1:
            raise ValueError(f"length and block must be >= 1 windows, got {length} and {block}")
        window_indices(1, window)
        self.cfg, self.length, self.seed, self.window, self.block = cfg, int(length), int(seed), int(window), block
        self.epoch, self.stage, self.sim_cfg = 0, len(cfg.curriculum), cfg.stage_config(len(cfg.curriculum))
        self._cached = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_stage(self, stage: int) -> None:
        self.stage, self.sim_cfg = int(stage), self.cfg.stage_config(int(stage))

    def __len__(self) -> int:
        return self.length

    def _block_movie(self, b: int) -> tuple[ColourMovie, torch.Tensor]:
        key = (self.epoch, self.stage, b)
        if self._cached is None or self._cached[0] != key:
            n_windows = min(self.block, self.length - b * self.block)
            seed = np.random.SeedSequence([self.seed, self.epoch, b, self.stage]).generate_state(1, np.uint64)[0]
            movie = simulate_colour_movie(self.sim_cfg, n_windows + self.window - 1,
                                          torch.Generator().manual_seed(int(seed)))
            frames = torch.stack([movie.frames[0], register_channel2(movie.frames[1], self.cfg.registration)])
            self._cached = key, movie, frames
        return self._cached[1], self._cached[2]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        b, k = divmod(int(i), self.block)
        movie, frames = self._block_movie(b)
        item = _colour_item(frames[:, k:k + self.window], movie.bg[:, k + self.window // 2], movie,
                            k + self.window // 2, self.cfg)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


class ColourMovieWindowDataset(Dataset):
    """Windows of a fixed two-colour movie (validation, test), item t centred on frame t; channel 2 registered
    onto channel 1's grid once here. Same items as `ColourSimDataset`."""

    def __init__(self, movie: ColourMovie, cfg: ColourConfig, window: int = 3):
        self.movie, self.cfg = movie, cfg
        self.frames = torch.stack([movie.frames[0], register_channel2(movie.frames[1], cfg.registration)])
        self.windows = window_indices(movie.frames.shape[1], window)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, t: int) -> dict:
        item = _colour_item(self.frames[:, self.windows[t]], self.movie.bg[:, t], self.movie, int(t), self.cfg)
        item["index"] = torch.tensor(t, dtype=torch.int64)
        return item


def collate_colour(items: list[dict]) -> dict:
    """Batch for `losses.smlm_colour.colour_loss_terms`: frames (B, 2, window, H, W); target_emitters
    (B, E, 6) zero-padded to the batch's largest count (at least 1); target_mask (B, E); channel_mask
    (B, 2, E); target_bg (B, 2, H, W); index (B,)."""
    n_max = max(1, max(item["target_emitters"].shape[0] for item in items))
    em = torch.zeros(len(items), n_max, 6)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    channel_mask = torch.zeros(len(items), 2, n_max, dtype=torch.bool)
    for b, item in enumerate(items):
        n = item["target_emitters"].shape[0]
        em[b, :n], mask[b, :n], channel_mask[b, :, :n] = item["target_emitters"], True, item["channel_mask"]
    return {"frames": torch.stack([item["frames"] for item in items]), "target_emitters": em,
            "target_mask": mask, "channel_mask": channel_mask,
            "target_bg": torch.stack([item["target_bg"] for item in items]),
            "index": torch.stack([item["index"] for item in items])}


def write_colour_h5(path, movie: ColourMovie, cfg: ColourConfig, mode: str = "test", seed: int | None = None) -> None:
    """The design notes' layout (smlm.md §7.3), one mode per call (appends to an existing file):
    {mode}/channel{c}/images (T, H, W) photons on that channel's camera, {mode}/channel{c}/bg (T, H, W),
    {mode}/channel{c}/targets (N, 4) frame_ix, x px, y px, z nm of that channel's emitters on its own camera
    grid, {mode}/channel{c}/photons (N,); {mode}/emitters/{frame_ix, xyz (channel-1 grid), phot (total), id,
    dye, ratio}; {mode}/metadata: JSON with format, seed, n_frames, units and the configuration."""
    e = movie.emitters
    with h5py.File(path, "a") as f:
        if mode in f:
            del f[mode]
        g = f.create_group(mode)
        for c in range(2):
            ce = movie.channel_emitters(c, cfg)
            ch = g.create_group(f"channel{c + 1}")
            ch.create_dataset("images", data=movie.frames[c].numpy().astype(np.float32), compression="gzip")
            ch.create_dataset("bg", data=movie.bg[c].numpy().astype(np.float32), compression="gzip")
            ch.create_dataset("targets", data=np.column_stack([ce.frame_ix.numpy(), ce.xyz.numpy()]).astype(np.float64))
            ch.create_dataset("photons", data=ce.phot.numpy())
        em = g.create_group("emitters")
        for name, value in (("frame_ix", e.frame_ix), ("xyz", e.xyz), ("phot", e.phot), ("id", e.id),
                            ("dye", movie.dye), ("ratio", movie.ratio)):
            em.create_dataset(name, data=value.numpy())
        g.create_dataset("metadata", data=json.dumps({
            "format": H5_FORMAT, "seed": -1 if seed is None else int(seed), "n_frames": int(movie.frames.shape[1]),
            "xy_unit": "px", "z_unit": "nm", "photon_unit": "photons", "config": cfg.to_dict()}))


def read_colour_h5(path, mode: str = "test") -> tuple[ColourMovie, ColourConfig, dict]:
    """(movie, config, metadata) of one mode of a `write_colour_h5` file; a missing file, mode or dataset
    raises one ValueError line naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: two-colour movie file not found")
    try:
        with h5py.File(path, "r") as f:
            if mode not in f or "metadata" not in f[mode]:
                raise ValueError(f"{path}: no {mode}/metadata (expected a two-colour movie, modes: "
                                 f"{', '.join(f.keys()) or 'none'})")
            meta = json.loads(f[mode]["metadata"][()])
            if meta.get("format") != H5_FORMAT:
                raise ValueError(f"{path}: {mode}/metadata format is {meta.get('format')!r}, expected {H5_FORMAT!r}")
            frames = torch.stack([torch.from_numpy(f[mode][f"channel{c}"]["images"][()]) for c in (1, 2)])
            bg = torch.stack([torch.from_numpy(f[mode][f"channel{c}"]["bg"][()]) for c in (1, 2)])
            em = {k: torch.from_numpy(f[mode]["emitters"][k][()]) for k in
                  ("frame_ix", "xyz", "phot", "id", "dye", "ratio")}
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable or incomplete two-colour movie ({e})") from None
    try:
        cfg = ColourConfig.from_dict(meta["config"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {mode}/metadata holds no valid configuration ({_one_line_error(e)})") from None
    if frames.shape[2:] != cfg.img_size or bg.shape != frames.shape:
        raise ValueError(f"{path}: images {tuple(frames.shape)} and bg {tuple(bg.shape)} must be "
                         f"(2, T, {cfg.img_size[0]}, {cfg.img_size[1]})")
    dye, ratio = em.pop("dye"), em.pop("ratio")
    return ColourMovie(frames, bg, Emitters(**em), dye, ratio), cfg, meta


def write_colour_tiff(out, cfg: ColourConfig, n_frames: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Simulate n_frames and write what a two-camera microscope gives: `out` (.tif, uint16 ADU, (T, 2, H, W):
    one stack with a channel axis) and the ground truth next to it (.h5, `write_colour_h5` mode "test"), each
    written under a temporary name and renamed, the ground truth first. Returns (tif, h5, the number of pixels
    clipped to the uint16 range)."""
    tif = Path(out)
    if tif.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"--out {tif}: expected a .tif or .tiff file name")
    adu, movie = simulate_colour_acquisition(cfg, n_frames, torch.Generator().manual_seed(seed))
    adu = adu.transpose(0, 1).numpy()
    clipped = int(((adu < 0) | (adu > 65535)).sum())
    tif.parent.mkdir(parents=True, exist_ok=True)
    h5 = tif.with_suffix(".h5")
    tmp_h5, tmp_tif = h5.with_name(h5.name + ".tmp"), tif.with_name(tif.name + ".tmp")
    tmp_h5.unlink(missing_ok=True)
    write_colour_h5(tmp_h5, movie, cfg, mode="test", seed=seed)
    tifffile.imwrite(tmp_tif, np.clip(adu, 0, 65535).astype(np.uint16), photometric="minisblack",
                     metadata={"axes": "TCYX"})
    tmp_h5.replace(h5)
    tmp_tif.replace(tif)
    return tif, h5, clipped


def read_colour_tiff(path1, path2=None, channel_axis: int | None = None) -> np.ndarray:
    """(2, T, H, W) float32 ADU from two single-channel TIFF stacks (path1, path2), or from one stack with a
    channel axis of length 2 (`channel_axis`, default: the axis of length 2 among the first two of a 4-D stack,
    e.g. (T, 2, H, W) or (2, T, H, W)). Errors are one line naming the file and what was expected."""
    def load(p):
        p = Path(p)
        if not p.is_file():
            raise ValueError(f"{p}: TIFF stack not found")
        try:
            return np.asarray(tifffile.imread(p), dtype=np.float32)
        except Exception as e:  # tifffile raises several types for a damaged file
            raise ValueError(f"{p}: not a readable TIFF stack ({type(e).__name__}: {e})") from None

    if path2 is not None:
        a, b = load(path1), load(path2)
        a, b = (x[None] if x.ndim == 2 else x for x in (a, b))
        if a.ndim != 3 or a.shape != b.shape:
            raise ValueError(f"{path1}, {path2}: expected two stacks of the same shape (T, H, W), got "
                             f"{a.shape} and {b.shape}")
        return np.stack([a, b])
    stack = load(path1)
    if stack.ndim == 3 and stack.shape[0] == 2:
        stack = stack[:, None]   # one frame per channel
    if stack.ndim != 4:
        raise ValueError(f"{path1}: expected a 4-D stack with a channel axis of length 2 ((T, 2, H, W) or "
                         f"(2, T, H, W)), or give the second channel as its own file; got shape {stack.shape}")
    if channel_axis is None:
        candidates = [ax for ax in (1, 0) if stack.shape[ax] == 2]
        if not candidates:
            raise ValueError(f"{path1}: no channel axis of length 2 among the first two axes of {stack.shape}")
        channel_axis = candidates[0]
    if stack.shape[channel_axis] != 2:
        raise ValueError(f"{path1}: channel axis {channel_axis} has length {stack.shape[channel_axis]}, expected 2")
    return np.moveaxis(stack, channel_axis, 0)
