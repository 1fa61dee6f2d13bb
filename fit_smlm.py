"""Localise single molecules in a TIFF stack with a trained train_smlm.py run.

    python fit_smlm.py --checkpoint runs/smlm/<run> --frames stack.tif --out locs.csv                 # ThunderSTORM CSV
    python fit_smlm.py --checkpoint runs/smlm/<run> --frames stack.tif --out locs.h5                  # DECODE HDF5
    python fit_smlm.py --checkpoint runs/smlm/<run> --frames stack.tif --out locs.csv --format decode # DECODE CSV
    python fit_smlm.py --checkpoint runs/smlm/<run> --frames stack.tif --camera my_camera.yaml --out locs.csv

Model: ``--checkpoint`` is a run directory, an export folder (``best/``, ``final/``) or a checkpoint; the
SigmaMUNet is rebuilt from the export's ``model.json`` (``training.export.load_export``) and loaded from
``best/model.safetensors`` (``--weights best``, the default; falls back to ``final/`` when the run has no
best/ export) or ``final/model.safetensors`` (``--weights final``). The input scaling, the output scales
(phot_max, z_max, bg_max) and the PSF come from the run's ``simulation.yaml`` (copied into every export)
and are never changed.

Frames: a TIFF stack in ADU (uint16 or float), one 2-D page per frame or a single 3-D page (T, H, W). It is
read ``--chunk_frames`` frames at a time, so a stack larger than memory works; each chunk carries
``window // 2`` neighbour frames on each side, so the network's windows (clamped at the movie ends, as in
training) and therefore the localisations are identical to processing the whole stack at once. The chunk
length is rounded up to a multiple of ``--batch_size`` for that: batches then hold the same frames as in
one pass, and a batch's numbers do not depend on where the file was cut. Frames whose size is not a
multiple of 2^depth are padded (edge pixels replicated) on the bottom and right, and the output is cropped
back before post-processing. A float stack is first scanned for NaN or inf pixels: by default such frames
are an error (one line with their count and first 0-based indices, before any fitting); with
``--nonfinite_frames skip`` they are fitted as missing frames: their non-finite pixels are set to the frame's
median (the camera baseline for a frame with no finite pixel), so the windows of their neighbours stay
finite, their own localisations are dropped, and the count is printed.

Camera: ADU -> photons with ``data.smlm.to_photons`` and the run's camera (``simulation.yaml``), unless
``--camera FILE`` is given: a YAML file whose ``simulation:`` section, or, when it has none, whose top-level
mapping holds some of the keys camera, qe, spur_noise, em_gain, e_per_adu, baseline, read_sigma,
read_sigma_map, sensor_origin, px_size_nm; they replace the run's values (other keys are an error: the model's
training distribution cannot be changed at fit time). px_size_nm only changes the nm conversion.

Post-processing: SpatialIntegration + look-up (models/sigma_munet_post.py) with ``--raw_th``; default: the threshold of
the evaluation the loaded weights come from (val/raw_th of the export's metrics.json; train_smlm.py chooses
it on its validation movie unless the run fixed --raw_th), else the run's raw_th. ``--refine`` then refits
each detection by Poisson maximum likelihood on its own frame, the frame's other detections held fixed as
neighbours, and keeps the fit where its standard error is below the network's predicted sigma (bright
emitters; models/smlm_mle.py); the refined rows carry the fit's position, photons, background and standard
errors. ``--sigma_filter`` applies last.

Output, by ``--format`` (default from the extension: .h5/.hdf5 DECODE HDF5, anything else ThunderSTORM CSV):
  thunderstorm  CSV with the header "id","frame","x [nm]","y [nm]","z [nm]","sigma [nm]","intensity [photon]",
                "offset [photon]","bkgstd [photon]","uncertainty [nm]" ("z [nm]" left out for a 2-D run,
                psf gaussian). id and frame are 1-based. x, y follow ImageJ/ThunderSTORM: (0, 0) is the top
                left corner of the image, so pixel (row i, col j) has its centre at ((j + 0.5) px_x,
                (i + 0.5) px_y) nm and the field is [0, W px_x] x [0, H px_y]. sigma = PSF width at the
                predicted z (geometric mean of the run's sigma_x, sigma_y, nm); intensity = predicted photons;
                offset = predicted background (photons/px); bkgstd = the noise std of a background pixel
                in photons (data.smlm.background_std_photons: shot noise with the EMCCD excess factor,
                read noise and ADU rounding, through the camera; an sCMOS read-noise map counts by its root
                mean square); uncertainty = predicted lateral sigma,
                sqrt((sigma_x^2 + sigma_y^2) / 2) nm.
                Photons, in both formats, are photons reaching the camera (detected photoelectrons / qe),
                as ThunderSTORM reports them with the same camera setup (photoelectrons per A/D count =
                e_per_adu, EM gain, base level = baseline, quantum efficiency = qe): intensity =
                (ADU - base level) x e_per_adu / (EM gain x qe) summed over the spot. ThunderSTORM's default
                quantum efficiency is 1, which makes it report photoelectrons: ours x qe.
  decode        DECODE EmitterSet (smlm.md 7.1), xy_unit "nm" with DECODE's convention (pixel (i, j) centre
                at (j px_x, i px_y) nm), z nm, frame_ix 0-based, id 0-based. .h5/.hdf5: groups meta (attrs
                xy_unit, px_size), decode (attr version) and data (xyz, xyz_sig, phot, phot_sig, frame_ix, id,
                prob, bg; xyz_cr, phot_cr, bg_cr and bg_sig are all NaN, as no CRLB is computed and bg has no
                predicted sigma, and are written as h5py.Empty("f")). Other extensions: CSV with three
                header lines (# DECODE EmitterSet, # decode meta JSON, # emitter meta JSON) and the columns
                x,y,z,phot,frame_ix,id,prob,bg,phot_cr,bg_cr,phot_sig,bg_sig,x_cr,y_cr,z_cr,x_sig,y_sig,z_sig.
The file is written to ``<out>.tmp`` and renamed (``training.io``); an existing ``--out`` is only replaced with
``--overwrite``, and an ``--out`` that is a directory or whose folder is not writable is refused before the
work. Bad input ends with one line naming the file or flag, exit status 2, nothing written.

Library use (benchmarks): ``load_fitter``, ``localise``, ``iter_tiff_chunks``, ``nonfinite_frames``,
``fill_nonfinite``, ``write_localisations``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import h5py
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from data.smlm import (SimConfig, background_std_photons, load_read_sigma_map, load_sim_config, psf_sigmas,
                       scale_frames, to_photons, window_indices)
from models.sigma_munet_post import (DETECTION_KEYS, MAX_SIGMA_XY_NM, MAX_SIGMA_Z_NM, detections_from_output,
                                     filter_by_sigma)
from models.smlm_mle import refine_detections
from training import UsageError
from training.config import fail
from training.export import load_export, resolve_device
from training.io import check_output, write_atomically

CAMERA_KEYS = ("camera", "qe", "spur_noise", "em_gain", "e_per_adu", "baseline", "read_sigma", "read_sigma_map",
               "sensor_origin", "px_size_nm")
FORMATS = ("thunderstorm", "decode")
NONFINITE_MODES = ("error", "skip")
H5_SUFFIXES = (".h5", ".hdf5")
DECODE_VERSION = "0.10.0"  # the DECODE release whose EmitterSet file layout is written
THUNDERSTORM_COLUMNS = ("id", "frame", "x [nm]", "y [nm]", "z [nm]", "sigma [nm]", "intensity [photon]",
                        "offset [photon]", "bkgstd [photon]", "uncertainty [nm]")
UNAVAILABLE = ("xyz_cr", "phot_cr", "bg_cr", "bg_sig")  # no CRLB is computed; bg has no predicted sigma
DECODE_CSV_COLUMNS = ("x", "y", "z", "phot", "frame_ix", "id", "prob", "bg", "phot_cr", "bg_cr", "phot_sig",
                      "bg_sig", "x_cr", "y_cr", "z_cr", "x_sig", "y_sig", "z_sig")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@dataclasses.dataclass
class FitSettings:
    window: int               # frames per network input (the model's n_frames)
    raw_th: float | None      # detection threshold of the loaded export's evaluation, else the run's fixed one
    weights: Path             # the safetensors file that was loaded


def load_fitter(checkpoint, weights: str = "best", device="cpu") -> tuple[torch.nn.Module, SimConfig, FitSettings]:
    """(model in eval mode on device, the run's SimConfig, FitSettings) of a train_smlm.py run, export or checkpoint,
    through ``training.export.load_export`` (the model is rebuilt from the export's model.json). settings.raw_th is
    the detection threshold of the evaluation the loaded export comes from (val/raw_th of its metrics.json: chosen
    on validation, or the run's fixed one); without it, args.yaml's (None for a run that chose it on validation:
    the caller must then pass one).

    weights "best" uses a run's best/, else final/; "final" uses final/. Raises UsageError (one line naming the
    file) on a missing or foreign run."""
    if weights not in ("best", "final"):
        raise UsageError(f"--weights must be best or final, got {weights!r}")
    path = Path(checkpoint)
    if weights == "final" and path.is_dir() and not (path / "model.safetensors").is_file():  # a run: final/ only
        if not (path / "final" / "model.safetensors").is_file():
            raise UsageError(f"--checkpoint {path}: no final/ export (the run has not finished); use --weights best")
        path = path / "final"
    try:
        export = load_export(path)
    except UsageError as e:
        raise UsageError(f"--checkpoint {e}") from None
    # An export carries the run's simulation.yaml; a checkpoint's is the run's own.
    sim_path = next((d / "simulation.yaml" for d in (export.record_dir, export.folder.parent)
                     if (d / "simulation.yaml").is_file()), export.record_dir / "simulation.yaml")
    try:
        cfg = load_sim_config(sim_path)
    except ValueError as e:
        raise UsageError(f"--checkpoint {_one_line(e)} (needed for the camera and the scaling)") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--checkpoint {sim_path}: not valid YAML ({_one_line(e)})") from None
    raw_th = export.metrics.get("val/raw_th", export.args.get("raw_th"))
    settings = FitSettings(window=int(export.record["kwargs"].get("n_frames", 3)),
                           raw_th=None if raw_th is None else float(raw_th), weights=export.weights)
    return export.model.to(device).eval(), cfg, settings


def apply_camera(cfg: SimConfig, path) -> SimConfig:
    """The run's config with the camera keys of YAML file ``path`` replaced (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--camera {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--camera {path}: not valid YAML ({_one_line(e)})") from None
    if isinstance(values, dict) and "simulation" in values:
        values = values["simulation"]
    if not isinstance(values, dict) or not values:
        raise UsageError(f"--camera {path}: expected a mapping (top level or a simulation: section) of some of "
                         f"{', '.join(CAMERA_KEYS)}")
    unknown = sorted(map(str, set(values) - set(CAMERA_KEYS)))
    if unknown:
        raise UsageError(f"--camera {path}: {', '.join(unknown)} cannot be changed at fit time; camera keys: "
                         f"{', '.join(CAMERA_KEYS)}")
    try:
        return dataclasses.replace(cfg, **values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--camera {path}: {_one_line(e)}") from None


def tiff_stack_shape(path) -> tuple[int, int, int]:
    """(T, H, W) of the first series of a TIFF file; UsageError naming the file when it is missing, not a
    TIFF, or not a stack of 2-D grey frames (axes ...YX with at most one other axis longer than 1)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--frames {path}: file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
        raise UsageError(f"--frames {path}: not a readable TIFF file ({_one_line(e)})") from None
    if len(shape) < 2 or axes[-2:] != "YX" or sum(n > 1 for n in shape[:-2]) > 1:
        raise UsageError(f"--frames {path}: expected a stack of 2-D grey frames (T, H, W), got shape {shape} "
                         f"(axes {axes})")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UsageError(f"--frames {path}: expected integer (ADU) or float pixels, got {dtype}")
    return int(np.prod(shape[:-2], dtype=np.int64)), shape[-2], shape[-1]


def iter_tiff_chunks(path, chunk_frames: int, context: int):
    """Yield (lo, hi, block_lo, block) over a TIFF stack of T frames: chunks [lo, hi) of chunk_frames frames,
    block = float32 numpy frames [block_lo, block_hi) as stored (ADU), block_lo = max(0, lo - context),
    block_hi = min(T, hi + context): the neighbours a window centred in [lo, hi) needs.

    One 2-D page per frame: only the block's pages are read. A single 3-D page or an ImageJ stack stored
    contiguously and uncompressed: the block's bytes are read from the file. Otherwise (a compressed
    multi-frame page) the page is read once, whole. Raises UsageError naming the file on bad input."""
    if chunk_frames < 1 or context < 0:
        raise ValueError(f"chunk_frames must be >= 1 and context >= 0, got {chunk_frames}, {context}")
    path = Path(path)
    n_frames, height, width = tiff_stack_shape(path)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        whole = None
        per_page = len(series.pages) == n_frames
        contiguous = not per_page and series.dataoffset is not None
        dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        for lo in range(0, n_frames, chunk_frames):
            hi = min(lo + chunk_frames, n_frames)
            block_lo, block_hi = max(0, lo - context), min(n_frames, hi + context)
            try:
                if per_page:
                    block = tif.asarray(key=range(block_lo, block_hi), series=0)
                elif contiguous:
                    frame_bytes = height * width * dtype.itemsize
                    block = tif.filehandle.read_array(dtype, (block_hi - block_lo) * height * width,
                                                      offset=series.dataoffset + block_lo * frame_bytes)
                else:
                    if whole is None:
                        whole = series.asarray().reshape(n_frames, height, width)
                    block = whole[block_lo:block_hi]
            except (tifffile.TiffFileError, OSError, ValueError) as e:
                raise UsageError(f"--frames {path}: cannot read frames {block_lo}..{block_hi - 1} "
                                 f"({_one_line(e)})") from None
            yield lo, hi, block_lo, np.asarray(block, dtype=np.float32).reshape(block_hi - block_lo, height, width)


def nonfinite_frames(path, chunk_frames: int = 512) -> np.ndarray:
    """0-based indices of the frames of a TIFF stack that hold a NaN or inf pixel, read chunk by chunk (an
    integer stack has none and is not read). Raises UsageError naming the file on bad input."""
    tiff_stack_shape(path)
    with tifffile.TiffFile(path) as tif:
        if not np.issubdtype(np.dtype(tif.series[0].dtype), np.floating):
            return np.zeros(0, np.int64)
    found = [lo + np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))
             for lo, _, _, block in iter_tiff_chunks(path, chunk_frames, 0)]
    return np.concatenate(found).astype(np.int64)


def fill_nonfinite(frames: np.ndarray, fallback: float) -> np.ndarray:
    """In place on (T, H, W) frames: the NaN/inf pixels of each frame set to the median of its finite pixels
    (its background level, so the windows of its neighbours stay finite), or to `fallback` (the camera
    baseline: no photons) for a frame without any. Each frame is filled from itself alone, so the result does
    not depend on how the stack is cut into chunks. Returns the indices of the frames filled."""
    bad = np.flatnonzero(~np.isfinite(frames).all(axis=(1, 2)))
    for t in bad:
        frame = frames[t]
        finite = np.isfinite(frame)
        frame[~finite] = np.median(frame[finite]) if finite.any() else fallback
    return bad


@torch.inference_mode()
def localise(model, frames_photons: torch.Tensor, cfg: SimConfig, window: int = 3, raw_th: float = 0.5,
             batch_size: int = 32, device="cpu", *, centre: tuple[int, int] | None = None,
             progress=None, sigma_filter: bool = False, refine: bool = False) -> dict[str, np.ndarray]:
    """Detections (models.sigma_munet_post.DETECTION_KEYS, numpy) of the frames (T, H, W) photons.

    Windows of `window` frames centred on each frame, indices clamped to [0, T) (data.smlm.window_indices);
    only the windows centred on frames [centre[0], centre[1]) are run (default all), in batches of
    batch_size starting at centre[0]. frame_ix indexes frames_photons. Frames are scaled with the run's
    input scaling and padded (replicate, bottom/right) to a multiple of 2^model.depth; the output is
    cropped back before post-processing. `progress` (a tqdm) is advanced by the frames done. `sigma_filter`
    drops detections whose predicted sigmas exceed DECODE's fitting-notebook limits (MAX_SIGMA_XY_NM,
    MAX_SIGMA_Z_NM). `refine` refits every detection by Poisson maximum likelihood in its own frame and keeps
    the fit where it is more precise (models.smlm_mle.refine_detections), before the sigma filter; the
    detections then carry "refined" (N,) bool, the rows the fit replaced.

    A frame's output can change in the last bits with the batch it is computed in (CPU kernels pick their
    blocking by batch shape), so per-chunk calls equal one whole-movie call exactly only when every chunk
    starts at a multiple of batch_size in the movie, as the command line arranges."""
    frames = torch.as_tensor(frames_photons)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (T, H, W), got {tuple(frames.shape)}")
    n_frames, height, width = frames.shape
    lo, hi = centre if centre is not None else (0, n_frames)
    if not 0 <= lo <= hi <= n_frames:
        raise ValueError(f"centre must be a range within [0, {n_frames}], got {centre}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    multiple = 2 ** getattr(model, "depth", 0)
    pad_h, pad_w = -height % multiple, -width % multiple
    windows = window_indices(n_frames, window)                               # (T, window)
    dets = []
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        ix = windows[start:stop]
        first = int(ix.min())
        # Each frame crosses to the device about once; the window gather happens there.
        sub = frames[first:int(ix.max()) + 1].to(device=device, dtype=torch.float32)
        x = scale_frames(sub[ix.to(sub.device) - first], cfg)                 # (B, window, H, W)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = model(x)[..., :height, :width].float()
        dets.append(detections_from_output(out, raw_th=raw_th, px_size_nm=cfg.px_size_nm, z_max_nm=cfg.z_max,
                                           phot_max=cfg.phot_max, bg_max=cfg.bg_max, frame_ix0=start))
        if progress is not None:
            progress.update(stop - start)
    if not dets:  # an all-zero p map has no detections: the empty arrays with the right shapes and dtypes
        dets = [detections_from_output(torch.zeros(1, 10, 1, 1), raw_th=raw_th, px_size_nm=cfg.px_size_nm,
                                       z_max_nm=cfg.z_max, phot_max=cfg.phot_max, bg_max=cfg.bg_max)]
    det = {k: np.concatenate([d[k] for d in dets]) for k in DETECTION_KEYS}
    if refine:
        # Only the windows' centre frames are refined, on their own pixels; context frames have no detections.
        det, det["refined"] = refine_detections(det, frames, cfg, device=device)
    if sigma_filter:
        det = filter_by_sigma(det, MAX_SIGMA_XY_NM, MAX_SIGMA_Z_NM)
    return det


def _thunderstorm_table(det: dict, cfg: SimConfig) -> tuple[list[str], np.ndarray, list[str]]:
    n = len(det["frame_ix"])
    px_x, px_y = cfg.px_size_nm
    xyz = det["xyz_px"].astype(np.float64)
    sx, sy = psf_sigmas(torch.from_numpy(xyz[:, 2]), cfg)
    sigma_nm = np.sqrt(sx.numpy() * px_x * sy.numpy() * px_y)
    sig = det["xyz_sig_nm"].astype(np.float64)
    bg = det["bg"].astype(np.float64)
    columns = {
        "id": np.arange(1, n + 1), "frame": det["frame_ix"] + 1,
        "x [nm]": (xyz[:, 0] + 0.5) * px_x, "y [nm]": (xyz[:, 1] + 0.5) * px_y, "z [nm]": xyz[:, 2],
        "sigma [nm]": sigma_nm, "intensity [photon]": det["phot"], "offset [photon]": bg,
        "bkgstd [photon]": background_std_photons(bg, cfg),
        "uncertainty [nm]": np.sqrt(0.5 * (sig[:, 0] ** 2 + sig[:, 1] ** 2)),
    }
    names = [c for c in THUNDERSTORM_COLUMNS if not (c == "z [nm]" and cfg.psf == "gaussian")]
    table = np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in names]) if n else \
        np.zeros((0, len(names)))
    fmt = ["%d" if c in ("id", "frame") else "%.3f" for c in names]
    return names, table, fmt


def _decode_fields(det: dict) -> dict[str, np.ndarray]:
    """EmitterSet fields in nm; the UNAVAILABLE ones are NaN."""
    n = len(det["frame_ix"])
    nan1, nan3 = np.full(n, np.nan, np.float32), np.full((n, 3), np.nan, np.float32)
    return {"xyz": det["xyz_nm"].astype(np.float32), "xyz_sig": det["xyz_sig_nm"].astype(np.float32),
            "xyz_cr": nan3, "phot": det["phot"].astype(np.float32), "phot_sig": det["phot_sig"].astype(np.float32),
            "phot_cr": nan1, "frame_ix": det["frame_ix"].astype(np.int64), "id": np.arange(n, dtype=np.int64),
            "prob": det["prob"].astype(np.float32), "bg": det["bg"].astype(np.float32), "bg_sig": nan1,
            "bg_cr": nan1}


def write_localisations(det: dict, path, fmt: str, cfg: SimConfig) -> None:
    """Write detections (localise's dict, frame_ix 0-based in the movie) as `fmt` ("thunderstorm" CSV, or
    "decode": HDF5 for .h5/.hdf5, CSV otherwise; module docstring), atomically via `<path>.tmp`. Overwrites."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    is_h5 = path.suffix.lower() in H5_SUFFIXES
    if fmt == "thunderstorm":
        if is_h5:
            raise ValueError(f"{path}: the thunderstorm format is a CSV file, not {path.suffix}")
        names, table, row_fmt = _thunderstorm_table(det, cfg)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                f.write(",".join(f'"{c}"' for c in names) + "\n")
                np.savetxt(f, table, fmt=row_fmt, delimiter=",")
    elif is_h5:
        fields = _decode_fields(det)

        def write(tmp):
            with h5py.File(tmp, "w") as f:
                f.create_group("meta").attrs.update({"xy_unit": "nm", "px_size": np.asarray(cfg.px_size_nm)})
                f.create_group("decode").attrs["version"] = DECODE_VERSION
                data = f.create_group("data")
                for name, value in fields.items():
                    data.create_dataset(name, data=h5py.Empty("f") if name in UNAVAILABLE else value)
    else:
        fields = _decode_fields(det)
        columns = {"x": fields["xyz"][:, 0], "y": fields["xyz"][:, 1], "z": fields["xyz"][:, 2],
                   "x_cr": fields["xyz_cr"][:, 0], "y_cr": fields["xyz_cr"][:, 1], "z_cr": fields["xyz_cr"][:, 2],
                   "x_sig": fields["xyz_sig"][:, 0], "y_sig": fields["xyz_sig"][:, 1],
                   "z_sig": fields["xyz_sig"][:, 2], **fields}
        n = len(fields["frame_ix"])
        table = (np.column_stack([columns[c].astype(np.float64) for c in DECODE_CSV_COLUMNS]) if n
                 else np.zeros((0, len(DECODE_CSV_COLUMNS))))
        # %.9g writes float32 values exactly.
        row_fmt = ["%d" if c in ("frame_ix", "id") else "%.9g" for c in DECODE_CSV_COLUMNS]
        meta = {"xy_unit": "nm", "px_size": [float(v) for v in cfg.px_size_nm]}

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                f.write("# DECODE EmitterSet\n")
                f.write(f"# {json.dumps({'version': DECODE_VERSION})}\n")
                f.write(f"# {json.dumps(meta)}\n")
                f.write(",".join(DECODE_CSV_COLUMNS) + "\n")
                np.savetxt(f, table, fmt=row_fmt, delimiter=",")
    write_atomically(path, write)


def output_format(out: Path, fmt: str | None) -> str:
    """--format, or the one the extension implies; UsageError for a combination that cannot be written."""
    is_h5 = out.suffix.lower() in H5_SUFFIXES
    if fmt is None:
        return "decode" if is_h5 else "thunderstorm"
    if fmt == "thunderstorm" and is_h5:
        raise UsageError(f"--out {out}: the thunderstorm format is a CSV file; use a .csv name or --format decode")
    return fmt


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="train_smlm.py run directory, an export folder (best/, final/) or a checkpoint")
    parser.add_argument("--frames", required=True, help="TIFF stack in ADU: (T, H, W), uint16 or float")
    parser.add_argument("--out", required=True, help="output file: .csv (ThunderSTORM or DECODE) or .h5/.hdf5 (DECODE)")
    parser.add_argument("--camera", default=None, help="YAML with camera keys replacing the run's (module docstring)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from the --out extension")
    parser.add_argument("--raw_th", type=float, default=None, help="detection threshold on p; default: the run's")
    parser.add_argument("--chunk_frames", type=int, default=512,
                        help="frames read at a time (rounded up to a multiple of --batch_size)")
    parser.add_argument("--batch_size", type=int, default=32, help="frames per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--weights", choices=("best", "final"), default="best",
                        help="for a run directory: best/ (else final/) or final/ weights")
    parser.add_argument("--sigma_filter", action="store_true",
                        help=f"drop detections with a predicted sigma above {MAX_SIGMA_XY_NM:g} nm (x, y) or "
                             f"{MAX_SIGMA_Z_NM:g} nm (z), as DECODE's fitting notebook")
    parser.add_argument("--refine", action="store_true",
                        help="refit each detection by Poisson maximum likelihood in its frame (astigmatic or 2D "
                             "Gaussian PSF) and keep the fit where its standard error is below the network's")
    parser.add_argument("--nonfinite_frames", choices=NONFINITE_MODES, default="error",
                        help="frames with NaN or inf pixels (float TIFFs): error stops before fitting; skip fits "
                             "them as missing (pixels set to the frame's median, no localisations from them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    if args.batch_size < 1 or args.chunk_frames < 1:
        fail(f"--batch_size and --chunk_frames must be >= 1, got {args.batch_size} and {args.chunk_frames}")
    if args.raw_th is not None and not 0 < args.raw_th < 1:
        fail(f"--raw_th must be in (0, 1), got {args.raw_th}")
    try:
        out = check_output(args.out, args.overwrite)
        fmt = output_format(out, args.format)
        n_frames, height, width = tiff_stack_shape(args.frames)
        device = resolve_device(args.device)
        model, cfg, settings = load_fitter(args.checkpoint, args.weights, device)
        if args.camera is not None:
            cfg = apply_camera(cfg, args.camera)
        if args.refine and cfg.psf not in ("gaussian", "astigmatic"):
            raise UsageError(f"--refine: the run's psf is {cfg.psf!r}; the maximum-likelihood refinement fits "
                             f"only the 'astigmatic' and 'gaussian' PSFs")
        # The stack's frame size, so that an sCMOS read-noise map (and its sensor_origin) is checked against
        # the frames before any fitting; bkgstd uses that map.
        cfg = dataclasses.replace(cfg, img_size=(height, width))
        load_read_sigma_map(cfg)
    except UsageError as e:
        fail(str(e))
    except ValueError as e:
        hint = ("; give your camera's read-noise map of the whole chip (read_sigma_map, and sensor_origin: where the "
                "stack sits on it) with --camera" if "read_sigma_map" in str(e) or "sensor_origin" in str(e) else "")
        fail(f"--camera/--checkpoint camera: {_one_line(e)}{hint}")
    raw_th = settings.raw_th if args.raw_th is None else args.raw_th
    if raw_th is None:
        fail(f"--checkpoint {args.checkpoint}: its {args.weights} export has no val/raw_th in metrics.json "
             "(the run picks its detection threshold on validation); pass --raw_th")
    context = settings.window // 2
    chunk = -(-args.chunk_frames // args.batch_size) * args.batch_size
    try:
        bad_frames = nonfinite_frames(args.frames, chunk)
    except UsageError as e:
        fail(str(e))
    shown = ", ".join(map(str, bad_frames[:5])) + (", ..." if len(bad_frames) > 5 else "")
    if len(bad_frames) and args.nonfinite_frames == "error":
        fail(f"--frames {args.frames}: {len(bad_frames)} frame(s) hold NaN or inf pixels (0-based frame indices "
             f"{shown}); pass --nonfinite_frames skip to fit them as missing frames")

    start_s = time.perf_counter()
    progress = tqdm(total=n_frames, unit="frame", desc="fitting", dynamic_ncols=True)
    dets = []
    try:
        for lo, hi, block_lo, block in iter_tiff_chunks(args.frames, chunk, context):
            if len(bad_frames):
                fill_nonfinite(block, fallback=cfg.baseline)
            photons = to_photons(torch.from_numpy(block), cfg)
            det = localise(model, photons, cfg, window=settings.window, raw_th=raw_th,
                           batch_size=args.batch_size, device=device, centre=(lo - block_lo, hi - block_lo),
                           progress=progress, sigma_filter=args.sigma_filter, refine=args.refine)
            det["frame_ix"] = det["frame_ix"] + block_lo
            keep = ~np.isin(det["frame_ix"], bad_frames)  # a missing frame yields no localisations
            dets.append({k: v[keep] for k, v in det.items()})
    except UsageError as e:
        progress.close()
        fail(str(e))
    progress.close()
    det = {k: np.concatenate([d[k] for d in dets]) for k in dets[0]}
    write_localisations(det, out, fmt, cfg)
    seconds = time.perf_counter() - start_s
    print(f"{len(det['frame_ix'])} localisations from {n_frames} frames ({height}x{width} px) in {seconds:.1f} s "
          f"({n_frames / max(seconds, 1e-9):.1f} frames/s on {device}) -> {out} ({fmt})")
    if args.refine:
        print(f"{int(det['refined'].sum())} of them refitted by maximum likelihood (--refine), the others the "
              f"network's")
    if len(bad_frames):
        print(f"{len(bad_frames)} frame(s) with NaN or inf pixels fitted as missing, no localisations from them "
              f"(0-based frame indices {shown})")


if __name__ == "__main__":
    main()
