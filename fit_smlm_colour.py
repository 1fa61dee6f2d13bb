"""Localise and colour single molecules in a two-channel TIFF stack with a trained train_smlm_colour.py run.

    python fit_smlm_colour.py --checkpoint runs/smlm_colour/<run> --frames stack.tif --out locs.csv     # (T, 2, H, W)
    python fit_smlm_colour.py --checkpoint runs/smlm_colour/<run> --frames ch1.tif --frames2 ch2.tif --out locs.h5
    python fit_smlm_colour.py ... --registration my_registration.yaml --min_confidence 0.95

Model and scales: as fit_smlm.py (``--checkpoint`` a run directory, export or checkpoint; the DoubleMUNet is
rebuilt from model.json; each channel's camera, input scaling and the output scales come from the run's
simulation.yaml, a data.smlm.colour.ColourConfig; ``--raw_th`` defaults to the threshold of the evaluation the
weights come from).

Frames: the two channels in ADU, as one stack with a channel axis of length 2 ((T, 2, H, W) or (2, T, H, W),
``--channel_axis`` to say which) or as two stacks of equal shape (``--frames2``). Each channel is converted to
photons with its own camera (``data.smlm.to_photons``), then channel 2 is resampled onto channel 1's pixel grid
with the registration: the run's (the one it was trained with), or the calibration of ``--registration FILE``
(a YAML mapping, or a ``registration:`` entry of a simulation: section, with shift_px [dx, dy], rotation_deg,
scale and optionally centre_px: channel 2 px = scale R (x1 - c) + c + shift, c = centre_px, by default the
run's, the centre of its training frames). The network was trained on channel 2 resampled with the run's
registration (which smooths its noise and its PSF in one particular way): a calibration far from it is a
shift of the data the network has seen, so train with your calibrated registration in the simulation. The whole stack is read into memory
(unlike fit_smlm.py, no chunking yet).

Localisations: each channel's detections (SpatialIntegration at raw_th) merged across the channels
(models/double_munet_post.py: a detection in each channel within 1 px is one emitter, at the inverse-variance
weighted position), its ratio r = ch1 / (ch1 + ch2) photons and sigma from the ratio head, and its dye by
maximum likelihood over the run's dyes (metrics.smlm_colour.assign_colour: dye k's ratio ~ Normal(mean_k,
spread_k^2 + sigma^2), priors the dyes' fractions) with the posterior as confidence; below ``--min_confidence``
the dye is -1 (unassigned, kept in the file).

Output, by extension:
  .csv      ThunderSTORM-style CSV: "id","frame","x [nm]","y [nm]","z [nm]","intensity [photon]",
            "uncertainty [nm]" (ThunderSTORM's names and conventions: 1-based id and frame, (0, 0) the top left
            corner of the image, photons reaching the camera), then "intensity ch1 [photon]", "intensity ch2
            [photon]", "ratio", "ratio sigma", "dye" (0-based, -1 unassigned), "confidence" and "channels"
            (1: channel 1 only, 2: channel 2 only, 3: both), which ThunderSTORM keeps as extra columns.
  .h5/.hdf5 DECODE EmitterSet layout (fit_smlm.py: meta, decode, data with xyz, xyz_sig, phot, frame_ix, id,
            prob; bg and every CRLB field empty), and a group colour with phot_ch (N, 2), ratio, ratio_sig, dye,
            confidence, channels (N, 2) bool, which DECODE's reader does not see.
Written to <out>.tmp and renamed; an existing --out is only replaced with --overwrite. Bad input ends with one
line naming the file or flag, exit status 2, nothing written.

Library use (benchmarks): ``load_colour_fitter``, ``localise_colour``, ``write_colour_localisations``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from data.smlm import to_photons, window_indices
from data.smlm.colour import (ColourConfig, Registration, load_colour_config, read_colour_tiff, register_channel2,
                              scale_colour_frames)
from fit_smlm import DECODE_VERSION, H5_SUFFIXES
from metrics.smlm_colour import assign_colour
from models.double_munet import DoubleMUNet
from models.double_munet_post import colour_detections
from training import UsageError
from training.config import fail
from training.export import load_export, resolve_device
from training.io import check_output, write_atomically

CSV_COLUMNS = ("id", "frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "uncertainty [nm]",
               "intensity ch1 [photon]", "intensity ch2 [photon]", "ratio", "ratio sigma", "dye", "confidence",
               "channels")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@dataclasses.dataclass
class ColourFitSettings:
    window: int               # frames per network input
    raw_th: float | None      # detection threshold of the loaded export's evaluation, else the run's fixed one
    min_confidence: float     # the run's --min_confidence
    weights: Path             # the safetensors file that was loaded


def load_colour_fitter(checkpoint, device="cpu") -> tuple[DoubleMUNet, ColourConfig, ColourFitSettings]:
    """(model in eval mode on device, the run's ColourConfig, ColourFitSettings) of a train_smlm_colour.py run, export
    or checkpoint (best/ of a run directory, else final/). Raises UsageError with one line on bad input."""
    try:
        export = load_export(checkpoint)
    except UsageError as e:
        raise UsageError(f"--checkpoint {e}") from None
    if not isinstance(export.model, DoubleMUNet):
        raise UsageError(f"--checkpoint {checkpoint}: expected a two-colour run (DoubleMUNet), got "
                         f"{type(export.model).__name__}; single-colour runs are fitted with fit_smlm.py")
    sim_path = next((d / "simulation.yaml" for d in (export.record_dir, export.folder.parent)
                     if (d / "simulation.yaml").is_file()), export.record_dir / "simulation.yaml")
    try:
        cfg = load_colour_config(sim_path)
    except (ValueError, yaml.YAMLError) as e:
        raise UsageError(f"--checkpoint {_one_line(e)} (needed for the cameras and the scaling)") from None
    raw_th = export.metrics.get("val/raw_th", export.args.get("raw_th"))
    settings = ColourFitSettings(window=export.model.n_frames, raw_th=None if raw_th is None else float(raw_th),
                                 min_confidence=float(export.args.get("min_confidence", 0.9)), weights=export.weights)
    return export.model.to(device).eval(), cfg, settings


def load_registration(path) -> Registration:
    """A Registration from YAML: top-level {shift_px, rotation_deg, scale}, or a registration: entry, also inside
    a simulation: section. UsageError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--registration {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--registration {path}: not valid YAML ({_one_line(e)})") from None
    for key in ("simulation", "registration"):
        if isinstance(values, dict) and key in values:
            values = values[key]
    if not isinstance(values, dict):
        raise UsageError(f"--registration {path}: expected a mapping with shift_px, rotation_deg and scale")
    try:
        return Registration(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--registration {path}: {_one_line(e)}") from None


@torch.inference_mode()
def localise_colour(model, frames_photons: torch.Tensor, cfg: ColourConfig, window: int = 3, raw_th: float = 0.5,
                    batch_size: int = 32, device="cpu", min_confidence: float = 0.0) -> dict:
    """Two-colour localisations of (2, T, H, W) frames in photons, channel 2 already on channel 1's grid.

    Returns {"ch1", "ch2", "merged"} (models/double_munet_post.colour_detections) with 0-based movie frame
    indices; merged also holds dye (-1 unassigned) and confidence. Frames must be a multiple of 2^depth in
    size (the training frames are; crop or pad others)."""
    frames = torch.as_tensor(frames_photons, dtype=torch.float32)
    if frames.ndim != 4 or frames.shape[0] != 2:
        raise ValueError(f"frames must be (2, T, H, W), got {tuple(frames.shape)}")
    n_frames = frames.shape[1]
    windows = window_indices(n_frames, window)
    ch1, ch2 = cfg.channels
    outputs = []
    for start in range(0, n_frames, batch_size):
        ix = windows[start:start + batch_size]                                # (B, window)
        x = scale_colour_frames(frames[:, ix], cfg).transpose(0, 1)           # (B, 2, window, H, W)
        outputs.append(model(x.to(device)).float().cpu())
    output = torch.cat(outputs) if outputs else torch.zeros(0, 22, *frames.shape[-2:])
    det = colour_detections(output, raw_th, px_size_nm=ch1.px_size_nm, z_max_nm=ch1.z_max, phot_max=ch1.phot_max,
                            bg_max=(ch1.bg_max, ch2.bg_max))
    merged = det["merged"]
    merged["dye"], merged["confidence"] = assign_colour(merged["ratio"], merged["ratio_sigma"], cfg.dye_means,
                                                        cfg.dye_spreads, cfg.dye_priors, min_confidence)
    return det


def adu_to_registered_photons(adu: np.ndarray, cfg: ColourConfig, registration: Registration) -> torch.Tensor:
    """(2, T, H, W) ADU -> photons, each channel with its own camera, channel 2 resampled onto channel 1's grid."""
    photons = [to_photons(torch.from_numpy(np.ascontiguousarray(adu[c])), ch) for c, ch in enumerate(cfg.channels)]
    return torch.stack([photons[0], register_channel2(photons[1], registration)])


def write_colour_localisations(merged: dict, path, cfg: ColourConfig) -> None:
    """Merged localisations (with dye and confidence) as the CSV or HDF5 of the module docstring, atomically."""
    path = Path(path)
    n = len(merged["frame_ix"])
    px_x, px_y = cfg.channel1.px_size_nm
    xyz = merged["xyz_px"].astype(np.float64)
    sig = merged["xyz_sig_nm"].astype(np.float64)
    channels = merged["channels"].astype(np.int64)
    if path.suffix.lower() in H5_SUFFIXES:
        empty = ("xyz_cr", "phot_cr", "bg_cr", "bg", "bg_sig", "phot_sig")

        def write(tmp):
            with h5py.File(tmp, "w") as f:
                f.create_group("meta").attrs.update({"xy_unit": "nm", "px_size": np.asarray(cfg.channel1.px_size_nm)})
                f.create_group("decode").attrs["version"] = DECODE_VERSION
                data = f.create_group("data")
                data["xyz"] = merged["xyz_nm"].astype(np.float32)
                data["xyz_sig"] = sig.astype(np.float32)
                data["phot"] = merged["phot"].astype(np.float32)
                data["frame_ix"] = merged["frame_ix"].astype(np.int64)
                data["id"] = np.arange(n, dtype=np.int64)
                data["prob"] = merged["prob"].astype(np.float32)
                for name in empty:
                    data.create_dataset(name, data=h5py.Empty("f"))
                colour = f.create_group("colour")
                colour["phot_ch"] = merged["phot_ch"].astype(np.float32)
                colour["ratio"] = merged["ratio"].astype(np.float32)
                colour["ratio_sig"] = merged["ratio_sigma"].astype(np.float32)
                colour["dye"] = merged["dye"].astype(np.int64)
                colour["confidence"] = merged["confidence"].astype(np.float32)
                colour["channels"] = merged["channels"].astype(bool)
                colour.attrs["dyes"] = json.dumps([dataclasses.asdict(d) for d in cfg.dyes])
    else:
        columns = {
            "id": np.arange(1, n + 1), "frame": merged["frame_ix"] + 1,
            "x [nm]": (xyz[:, 0] + 0.5) * px_x, "y [nm]": (xyz[:, 1] + 0.5) * px_y, "z [nm]": xyz[:, 2],
            "intensity [photon]": merged["phot"], "uncertainty [nm]": np.sqrt(0.5 * (sig[:, 0] ** 2 + sig[:, 1] ** 2)),
            "intensity ch1 [photon]": merged["phot_ch"][:, 0], "intensity ch2 [photon]": merged["phot_ch"][:, 1],
            "ratio": merged["ratio"], "ratio sigma": merged["ratio_sigma"], "dye": merged["dye"],
            "confidence": merged["confidence"], "channels": channels[:, 0] + 2 * channels[:, 1],
        }
        table = (np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in CSV_COLUMNS]) if n
                 else np.zeros((0, len(CSV_COLUMNS))))
        fmt = ["%d" if c in ("id", "frame", "dye", "channels") else "%.5g" if c in ("ratio", "ratio sigma",
                                                                                 "confidence") else "%.3f"
               for c in CSV_COLUMNS]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                f.write(",".join(f'"{c}"' for c in CSV_COLUMNS) + "\n")
                np.savetxt(f, table, fmt=fmt, delimiter=",")
    write_atomically(path, write)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="train_smlm_colour.py run directory, export or checkpoint")
    parser.add_argument("--frames", required=True,
                        help="TIFF in ADU: both channels ((T, 2, H, W) or (2, T, H, W)), or channel 1 with --frames2")
    parser.add_argument("--frames2", default=None, help="TIFF in ADU of channel 2, the shape of --frames")
    parser.add_argument("--channel_axis", type=int, default=None,
                        help="axis of the two channels in --frames (default: the one of length 2 among the first two)")
    parser.add_argument("--out", required=True, help="output .csv or .h5/.hdf5 (module docstring)")
    parser.add_argument("--registration", default=None,
                        help="YAML with channel 2's shift_px, rotation_deg, scale (default: the run's)")
    parser.add_argument("--raw_th", type=float, default=None, help="detection threshold on p; default: the run's")
    parser.add_argument("--min_confidence", type=float, default=None,
                        help="posterior below which the dye is -1; default: the run's --min_confidence")
    parser.add_argument("--batch_size", type=int, default=32, help="frames per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.raw_th is not None and not 0 < args.raw_th < 1:
        fail(f"--raw_th must be in (0, 1), got {args.raw_th}")
    if args.min_confidence is not None and not 0 <= args.min_confidence < 1:
        fail(f"--min_confidence must be in [0, 1), got {args.min_confidence}")
    try:
        out = check_output(args.out, args.overwrite)
        device = resolve_device(args.device)
        model, cfg, settings = load_colour_fitter(args.checkpoint, device)
        registration = cfg.registration if args.registration is None else load_registration(args.registration)
        if registration.centre_px is None:   # a calibration without its own centre turns about the run's
            registration = dataclasses.replace(registration, centre_px=cfg.registration.centre_px)
        try:
            adu = read_colour_tiff(args.frames, args.frames2, args.channel_axis)
        except ValueError as e:
            raise UsageError(f"--frames: {_one_line(e)}") from None
    except UsageError as e:
        fail(str(e))
    multiple = 2 ** model.depth
    if adu.shape[2] % multiple or adu.shape[3] % multiple:
        fail(f"--frames: frames of {adu.shape[2]}x{adu.shape[3]} px must be a multiple of {multiple} px on each "
             "side for this network; crop the stack")
    raw_th = settings.raw_th if args.raw_th is None else args.raw_th
    if raw_th is None:
        fail(f"--checkpoint {args.checkpoint}: no val/raw_th in the export's metrics.json; pass --raw_th")
    min_confidence = settings.min_confidence if args.min_confidence is None else args.min_confidence
    start = time.perf_counter()
    photons = adu_to_registered_photons(adu, cfg, registration)
    det = localise_colour(model, photons, cfg, settings.window, raw_th, args.batch_size, device, min_confidence)
    merged = det["merged"]
    write_colour_localisations(merged, out, cfg)
    seconds = time.perf_counter() - start
    n_frames = adu.shape[1]
    counts = np.bincount(merged["dye"] + 1, minlength=len(cfg.dyes) + 1)
    print(f"{len(merged['frame_ix'])} localisations from {n_frames} frames ({adu.shape[2]}x{adu.shape[3]} px, two "
          f"channels) in {seconds:.1f} s ({n_frames / max(seconds, 1e-9):.1f} frames/s on {device}) -> {out}; "
          + ", ".join(f"dye {k}: {counts[k + 1]}" for k in range(len(cfg.dyes)))
          + f", unassigned (confidence < {min_confidence:g}): {counts[0]}")


if __name__ == "__main__":
    main()
