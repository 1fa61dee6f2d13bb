"""Files: fixed movies in HDF5 (frames, background, emitters, configuration) and TIFF stacks in ADU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import tifffile
import torch
import yaml

from .config import SimConfig
from .simulate import Emitters, Movie, simulate_acquisition

H5_FORMAT = "smlm-movie-1"


def write_movie_h5(path, movie: Movie, cfg: SimConfig, seed: int | None = None) -> None:
    """Store a fixed movie: /data/frames (T, H, W) photons, /data/bg (T, H, W) photons/px (gzip), /emitters/
    {frame_ix, xyz (x px, y px, z nm), phot, id}, /meta attrs: format, xy_unit "px", px_size (nm), n_frames,
    seed (-1 if unknown) and config (the full SimConfig as YAML; with the movie's sensor_origin on an sCMOS
    read-noise map filled in, so that the config describes this acquisition's window)."""
    if movie.sensor_origin is not None:
        cfg = dataclasses.replace(cfg, sensor_origin=tuple(movie.sensor_origin))
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
    return Movie(frames, bg, Emitters(**em), cfg.sensor_origin), cfg, meta


def write_tiff_movie(out, cfg: SimConfig, n_frames: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """Simulate n_frames and write what a microscope would give fit_smlm.py: `out` (.tif, uint16 ADU, one page
    per frame) and the ground truth next to it (`out` with .h5: `write_movie_h5`, frames in photons, emitters
    in px / nm, the configuration). Returns (tif, h5, summary)."""
    tif = Path(out)
    if tif.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"--out {tif}: expected a .tif or .tiff file name")
    adu, movie = simulate_acquisition(cfg, n_frames, torch.Generator().manual_seed(seed))
    adu = adu.numpy()
    saturated = int((adu > 65535).sum())
    tif.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tif, np.clip(adu, 0, 65535).astype(np.uint16), photometric="minisblack")
    h5 = tif.with_suffix(".h5")
    write_movie_h5(h5, movie, cfg, seed=seed)
    return tif, h5, {"frames": n_frames, "emitters": len(movie.emitters), "saturated_pixels": saturated,
                     "sensor_origin": movie.sensor_origin}

