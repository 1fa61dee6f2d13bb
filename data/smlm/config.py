"""The simulation's physical parameters (`SimConfig`, smlm.md §1.1 / §12) and their YAML loading, with the
input/target scales the simulator derives from them (smlm.md §1.6)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .psf import load_smap_spline

PSF_KINDS = ("gaussian", "astigmatic", "spline")
CAMERA_KINDS = ("emccd", "scmos", "perfect", "noiseless")


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
    read_sigma_map: str | None = None              # scmos only: .npy read noise std (e-) of the sensor, at least
                                                   # img_size; replaces read_sigma
    sensor_origin: tuple[int, int] | None = None   # (row, col) of the frames on the read_sigma_map sensor; blank: a
                                                   # random place per simulated movie when the map is larger
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
        if self.sensor_origin is not None:
            if self.read_sigma_map is None:
                raise ValueError("sensor_origin is the frames' place on the read_sigma_map; set read_sigma_map too")
            origin = self.sensor_origin
            if (not isinstance(origin, (list, tuple)) or len(origin) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in origin)):
                raise ValueError(f"sensor_origin must be two integers [row, col] >= 0, got {origin!r}")
            self.sensor_origin = (int(origin[0]), int(origin[1]))
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

    # Scaling of smlm.md §1.6 (DECODE `autoset_scaling`): network inputs and targets of order 1, so one set of
    # initial weights and learning rates fits every camera and brightness.
    @property
    def input_scale(self) -> float:
        # photons; DECODE's divisor: an in-focus emitter of mean flux then peaks at ~7 (sigma0 = 1 px) above bg.
        return self.intensity_mu / 50.0

    @property
    def input_offset(self) -> float:
        return 0.5 * (self.bg_uniform[0] + self.bg_uniform[1])

    @property
    def phot_max(self) -> float:
        # photons; mean + 8 std: above every simulated flux, so photons / phot_max stays inside the sigmoid's (0, 1).
        return self.intensity_mu + 8.0 * self.intensity_sig

    @property
    def z_max(self) -> float:
        # DECODE uses 1.2 * upper z; the larger |bound| is the same for the usual symmetric range and stays
        # positive for ranges below focus.
        return 1.2 * max(abs(self.z_range_nm[0]), abs(self.z_range_nm[1]), 1e-6)

    @property
    def bg_max(self) -> float:
        # photons/px; 20 % headroom above the largest simulated level, as for z_max.
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

