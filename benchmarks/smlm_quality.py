"""Localisation quality and speed of a trained SMLM run against a classical MLE fitter on fixed test movies.

    python benchmarks/smlm_quality.py --checkpoint runs/smlm/<run> --out bench_out
    python benchmarks/smlm_quality.py --classical_only --out bench_out      # no network needed

Test movies: the run's simulation (its simulation.yaml; with --classical_only and no --checkpoint the
simulation: section of --sim_config) with only the density (emitter_density per um^2 per frame, emitter_av
unset) and img_size changed, one movie of --frames frames per density, simulated on the CPU from a seed
derived from (--seed, density). They are written with data.smlm.write_movie_h5 to
<out>/smlm_movies/ and reused by later calls when the file's config, seed and length match.

Ground truth: metrics.smlm_crlb.ground_truth, as for the validation movie: the emitters with >= label_photon_min
photons in the frame and inside the frame extent. Each one's lateral CRLB is sqrt(crlb_x^2 + crlb_y^2) from
metrics.smlm_crlb.emitter_crlb_nm (single-emitter limit, the run's camera and PSF), so rmse_over_crlb is the
matched RMSE over the RMS bound of the matched emitters.

Methods, on the photon frames of the movie:
- ours:      fit_smlm.localise (SigmaMUNet + SpatialIntegration at --raw_th; default: the run's raw_th, or the
             one it chose on its validation movie, val/raw_th of the export's metrics.json).
- ours, sigma filter: the same detections without those whose predicted sigma x or y exceeds 40 nm or sigma z
             80 nm (DECODE's fitting notebook; models.sigma_munet_post.filter_by_sigma): the trade of recall
             for precision and RMSE that the filter makes. Its time is ours'.
- classical: benchmarks/smlm_classical.fit_movie with its defaults (matched-filter detection at 5 noise
             sigma, 3 x 3 local maxima, Poisson MLE of x, y, [z,] N, b by Levenberg-Marquardt, quality filter).
- ours, MLE refined: the same detections refitted (models.smlm_mle.refine_detections, fit_smlm.py --refine: a
             Poisson likelihood fit in its own frame, started at the network's estimate, close detections
             together, the frame's others held fixed; kept where the fit is better, module docstring there).
             Its time is ours' plus the refit's.
- crlb oracle: metrics.smlm_crlb.crlb_oracle, every ground-truth emitter at its true position plus Normal noise
             of its own bound on x, y (and z): what an ideal single-frame fitter would give. Not timed.
Matching and metrics: metrics.smlm.smlm_metrics (250 nm lateral, 500 nm axial, greedy per frame). For a 2D
Gaussian PSF z carries no information, so predictions and ground truth are compared in 2D (z set to 0,
no axial threshold) and the axial columns are empty.
A second table splits each movie's ground truth into quartiles of its photons in the frame
(metrics.smlm.binned_metrics; the same bins for every method) and gives recall, lateral RMSE, median lateral
error, axial RMSE and rmse_over_crlb per quartile: where a method falls short of the bound, and for whom.
The notes check the aims of docs/smlm.md: rmse_over_crlb <= 1.2 in every quartile at the lowest density,
effcy_vol within 0.05 of the oracle's there, Jaccard >= 0.85 at the highest density.
Speed: wall clock of one call over the whole movie, including post-processing / the quality filter, after
a warm-up call on 4 frames; frames/s = frames / seconds. ours runs on --device, the classical fitter too.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import dataclasses
import time

import numpy as np
import torch

from benchmarks.common import float_list, positive, print_header, report, table
from benchmarks.smlm_classical import default_roi_radius, fit_movie
from data.smlm import SimConfig, load_sim_config, read_movie_h5, simulate_movie, write_movie_h5
from fit_smlm import load_fitter, localise
from metrics.smlm import binned_metrics, match_emitters, smlm_metrics
from metrics.smlm_crlb import crlb_oracle, ground_truth
from models.sigma_munet_post import MAX_SIGMA_XY_NM, MAX_SIGMA_Z_NM, filter_by_sigma
from models.smlm_mle import refine_detections
from training import UsageError
from training.config import fail

COLUMNS = ["density", "emitters/frame", "method", "jaccard", "recall", "precision", "rmse_lat_nm", "rmse_ax_nm",
           "effcy_lat", "effcy_ax", "effcy_vol", "rmse_over_crlb", "crlb_lat_nm", "frames/s"]
FORMATS = {"jaccard": ".3f", "recall": ".3f", "precision": ".3f", "effcy_lat": ".3f", "effcy_ax": ".3f",
           "effcy_vol": ".3f", "median_lat_nm": ".1f",
           "emitters/frame": ".1f", "rmse_lat_nm": ".1f", "rmse_ax_nm": ".1f", "crlb_lat_nm": ".1f",
           "frames/s": ".1f"}
ORACLE = "crlb oracle"
SIGMA_FILTERED = "ours, sigma filter"
REFINED = "ours, MLE refined"
QUARTILE_COLUMNS = ["density", "method", "photons", "n_gt", "recall", "rmse_lat_nm", "median_lat_nm", "rmse_ax_nm",
                    "crlb_lat_nm", "rmse_over_crlb"]
LABELS = ("low", "medium", "high")
# Aims of the SMLM precision work (docs/smlm.md): at the lowest density every photon quartile within 1.2x its
# bound and the volumetric efficiency within 0.05 of the CRLB oracle's; at the highest a Jaccard of 0.85.
CHECK_QUARTILE_RATIO = 1.2
CHECK_EFFCY_GAP = 0.05
CHECK_HIGH_JACCARD = 0.85


def image_size(text: str) -> tuple[int, int]:
    """--img_size: "64" (square) or "H,W" px."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        fail(f"--img_size {text!r}: expected one size in px (64) or H,W (64,96)")
    return (values[0], values[-1])


def test_movie(cfg: SimConfig, n_frames: int, base_seed: int, folder: Path):
    """(movie, its file, cfg): the movie of cfg (simulated once, then read back from folder). Its generator
    seed is derived from (base_seed, density), so adding a density leaves the other movies unchanged. On an
    sCMOS whose read-noise map is larger than the frames, the returned cfg holds the movie's sensor_origin:
    the classical fitter weights each pixel by its own read noise."""
    h, w = cfg.img_size
    density = cfg.emitter_density
    seed = int(np.random.SeedSequence([base_seed, round(density * 1e6)]).generate_state(1)[0] & 0x7FFFFFFF)
    path = folder / f"smlm_test_{h}x{w}_T{n_frames}_d{density:g}_seed{base_seed}.h5"
    if path.is_file():
        try:
            movie, stored, meta = read_movie_h5(path)
            if cfg.sensor_origin is None:  # the file records the place it drew
                stored = dataclasses.replace(stored, sensor_origin=None)
            if stored.to_dict() == cfg.to_dict() and meta["seed"] == seed and movie.frames.shape[0] == n_frames:
                return movie, path, at_sensor_origin(cfg, movie)
        except ValueError:
            pass  # a foreign or broken file under our name: simulate it again
        print(f"  {path}: other config, seed or length; simulating again", flush=True)
    movie = simulate_movie(cfg, n_frames, torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    write_movie_h5(path, movie, cfg, seed=seed)
    return movie, path, at_sensor_origin(cfg, movie)


def at_sensor_origin(cfg: SimConfig, movie) -> SimConfig:
    return cfg if movie.sensor_origin is None else dataclasses.replace(cfg, sensor_origin=movie.sensor_origin)


def timed_call(fn, frames: torch.Tensor, device: torch.device) -> tuple[dict, float]:
    fn(frames[:4])  # warm-up: first-call allocations and kernel selection stay out of the timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    det = fn(frames)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return det, time.perf_counter() - start


def match(det: dict, gt: dict, cfg: SimConfig):
    """(pred nm, true nm, matching options, (pred_idx, gt_idx)) of detections against `ground_truth`. For a 2D
    Gaussian PSF z carries no information: positions are compared laterally (module docstring)."""
    pred, true = np.asarray(det["xyz_nm"], dtype=np.float64), gt["xyz_nm"]
    match_kw = {}
    if cfg.psf == "gaussian":
        pred, true = pred[:, :2], true[:, :2]
        match_kw = {"dist_ax": None, "match_dims": 2}
    return pred, true, match_kw, match_emitters(pred, det["frame_ix"], true, gt["frame_ix"], **match_kw)


def score(det: dict, gt: dict, cfg: SimConfig) -> tuple[dict, list[dict]]:
    """(metrics of smlm_metrics, per photon quartile of the ground truth: binned_metrics)."""
    pred, true, match_kw, pairs = match(det, gt, cfg)
    m = smlm_metrics(pred, det["frame_ix"], true, gt["frame_ix"], gt_crlb_lat_nm=gt["crlb_lat_nm"], pairs=pairs,
                     **match_kw)
    return m, binned_metrics(pred, true, *pairs, gt["phot"], gt["crlb_lat_nm"], n_bins=4)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="train_smlm.py run directory (required unless --classical_only)")
    p.add_argument("--weights", default="best", choices=("best", "final"), help="which export of the run")
    p.add_argument("--classical_only", action="store_true", help="skip the network; only the classical fitter")
    p.add_argument("--sim_config", default=str(ROOT / "configs" / "smlm_quick.yaml"),
                   help="YAML with a simulation: section, used with --classical_only when no --checkpoint is given")
    p.add_argument("--out", default="bench_out", help="folder for smlm_quality.md/.json and smlm_movies/")
    p.add_argument("--frames", type=int, default=256, help="frames per test movie")
    p.add_argument("--img_size", default="64", help="frame size in px: 64 or H,W")
    p.add_argument("--densities", default="0.1,0.5,1.5", help="emitters per um^2 per frame, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="test-movie seed (each density derives its own)")
    p.add_argument("--device", default="cpu", help="torch device for both methods")
    p.add_argument("--raw_th", type=float, default=None, help="ours: detection threshold (default: the run's raw_th)")
    p.add_argument("--batch_size", type=int, default=32, help="ours: frames per forward pass")
    p.add_argument("--threshold", type=float, default=5.0, help="classical: detection threshold in noise sigmas")
    flags = p.parse_args()
    positive("--frames", flags.frames, 4)
    positive("--batch_size", flags.batch_size)
    densities = float_list(flags.densities, "--densities", strict=True)
    img_size = image_size(flags.img_size)
    try:
        device = torch.device(flags.device)
    except RuntimeError:
        fail(f"--device {flags.device!r}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {flags.device}: CUDA is not available on this machine")
    if flags.checkpoint is None and not flags.classical_only:
        fail("--checkpoint RUN is required (a train_smlm.py run directory), or pass --classical_only")

    model = settings = None
    try:
        if not flags.classical_only:
            model, run_cfg, settings = load_fitter(flags.checkpoint, flags.weights, device)
        elif flags.checkpoint is not None:
            run_cfg = load_sim_config(Path(flags.checkpoint) / "simulation.yaml")
        else:
            run_cfg = load_sim_config(flags.sim_config)
    except (UsageError, ValueError) as e:
        fail(str(e))
    roi_px = 2 * default_roi_radius(run_cfg) + 1
    if min(img_size) < roi_px:
        fail(f"--img_size {flags.img_size}: frames must be at least {roi_px} px (the classical fitter's ROI)")
    raw_th = flags.raw_th if flags.raw_th is not None or settings is None else settings.raw_th
    if model is not None and raw_th is None:
        fail(f"--checkpoint {flags.checkpoint}: its {flags.weights} export has no val/raw_th; pass --raw_th")
    source = flags.checkpoint or flags.sim_config
    info = print_header("SMLM: trained network vs classical MLE fitter")

    rows, quartile_rows, per_density, movies = [], [], [], []
    labels = LABELS if len(densities) == 3 else [f"#{i + 1}" for i in range(len(densities))]
    order = np.argsort(densities)
    for rank, i in enumerate(order):
        density = densities[i]
        try:
            cfg = dataclasses.replace(run_cfg, img_size=img_size, emitter_av=None, emitter_density=density)
        except ValueError as e:
            fail(f"--img_size/--densities: {e}")
        movie, path, cfg = test_movie(cfg, flags.frames, flags.seed, Path(flags.out) / "smlm_movies")
        movies.append(str(path))
        gt = ground_truth(movie, cfg)
        frames = movie.frames
        name = f"{density:g} ({labels[rank]})"
        base = {"density": name, "emitters/frame": len(gt["frame_ix"]) / flags.frames}
        results, quartiles = {}, {}
        two_d = cfg.psf == "gaussian"
        methods = [] if model is None else [("ours", lambda f: localise(model, f, cfg, window=settings.window,
                                                                          raw_th=raw_th, batch_size=flags.batch_size,
                                                                          device=device))]
        methods.append(("classical", lambda f: fit_movie(f, cfg, threshold=flags.threshold, device=device)))
        if np.isfinite(gt["crlb_nm"][:, :2]).all():  # a spline PSF has no closed-form bound: no oracle
            methods.append((ORACLE, None))
        if model is not None:
            methods.insert(1, (SIGMA_FILTERED, None))
            if cfg.psf in ("gaussian", "astigmatic"):
                methods.insert(2, (REFINED, None))
        for method, fn in methods:
            if method == ORACLE:  # no fitting, nothing to time
                det, seconds = crlb_oracle(gt, seed=flags.seed), None
            elif method == SIGMA_FILTERED:  # ours' detections, filtered: the same network time
                det, seconds = filter_by_sigma(ours_det), results["ours"]["seconds"]
            elif method == REFINED:  # ours' detections refitted: the network's time plus the refinement's
                def refit(f):  # the warm-up call passes the first frames only: their detections
                    sub = {k: v[ours_det["frame_ix"] < len(f)] for k, v in ours_det.items()}
                    return refine_detections(sub, f, cfg, device=device)[0]
                det, seconds = timed_call(refit, frames, device)
                seconds += results["ours"]["seconds"]
            else:
                try:
                    det, seconds = timed_call(fn, frames, device)
                except ValueError as e:
                    fail(f"{method} on {path}: {e}")
            if method == "ours":
                ours_det = det
            m, bins = score(det, gt, cfg)
            m["frames_per_s"] = None if seconds is None else flags.frames / seconds
            m["seconds"], m["detections"] = seconds, len(det["frame_ix"])
            results[method], quartiles[method] = m, bins
            rows.append({**base, "method": method, "jaccard": m["jaccard"], "recall": m["recall"],
                         "precision": m["precision"], "rmse_lat_nm": m["rmse_lat"],
                         "rmse_ax_nm": None if two_d else m["rmse_ax"], "effcy_lat": m["effcy_lat"],
                         "effcy_ax": None if two_d else m["effcy_ax"],
                         "effcy_vol": None if two_d else m["effcy_vol"],
                         "rmse_over_crlb": m.get("rmse_over_crlb"), "crlb_lat_nm": m.get("crlb_lat"),
                         "frames/s": m["frames_per_s"]})
            for q, b in enumerate(bins):
                quartile_rows.append({"density": name, "method": method,
                                      "photons": f"Q{q + 1} {b['lo']:.0f}-{b['hi']:.0f}", "n_gt": b["n_gt"],
                                      "recall": b["recall"], "rmse_lat_nm": b["rmse_lat"],
                                      "median_lat_nm": b["median_lat"],
                                      "rmse_ax_nm": None if two_d else b["rmse_ax"],
                                      "crlb_lat_nm": b["crlb_lat"], "rmse_over_crlb": b["rmse_over_crlb"]})
            speed = "" if seconds is None else f", {m['frames_per_s']:.1f} frames/s"
            by_quartile = " ".join(f"{b['rmse_over_crlb']:.2f}" for b in bins)
            print(f"  {name:>14} {method:>12}: Jaccard {m['jaccard']:.3f}, RMSE lat {m['rmse_lat']:.1f} nm, "
                  f"rmse/CRLB by photon quartile {by_quartile}{speed}", flush=True)
        per_density.append({"density_per_um2": density, "label": labels[rank], "movie": str(path),
                            "gt_emitters": int(len(gt["frame_ix"])), "metrics": results,
                            "photon_quartiles": quartiles})

    notes = [f"Simulation: {source} ({run_cfg.psf} PSF, {run_cfg.camera} camera, {run_cfg.intensity_mu:g} +- "
             f"{run_cfg.intensity_sig:g} photons, bg {run_cfg.bg_uniform[0]:g}-{run_cfg.bg_uniform[1]:g} photons/px) "
             f"with img_size {img_size[0]}x{img_size[1]} px and emitter_density per row; {flags.frames} frames each, "
             f"--seed {flags.seed}; movies in {Path(flags.out) / 'smlm_movies'}.",
             f"ours: {flags.checkpoint} ({flags.weights}), raw_th {raw_th}" if model is not None
             else "ours: not run (--classical_only).",
             f"classical: benchmarks/smlm_classical.py fit_movie, threshold {flags.threshold} noise sigmas.",
             f"{SIGMA_FILTERED}: ours without detections whose predicted sigma exceeds {MAX_SIGMA_XY_NM:g} nm "
             f"(x, y) or {MAX_SIGMA_Z_NM:g} nm (z).",
             f"{REFINED}: ours with every detection refitted by Poisson maximum likelihood in its own frame "
             "(models.smlm_mle.refine_detections, fit_smlm.py --refine: close detections fitted together, the "
             "frame's others held fixed, two passes), the fit kept where it converged, passes the chi^2 test at "
             "5 %, moved <= 1 px and its standard error is below the network's predicted sigma; frames/s counts "
             "the network and the refit.",
             f"{ORACLE}: every ground-truth emitter at its true position plus Normal noise of its own CRLB on each "
             "axis (metrics.smlm_crlb.crlb_oracle), matched like the methods: the physical limit of one frame.",
             "emitters/frame: ground-truth targets (>= label_photon_min photons, inside the frame) per frame. "
             "CRLB lat: RMS single-emitter lateral bound of the matched emitters; rmse_over_crlb = RMSE lat / it.",
             "Second table: the ground truth of each movie split into quartiles of its photons in the frame "
             "(the same bins for every method); recall and errors per quartile, median_lat the median lateral "
             "error of the matched pairs."]
    if run_cfg.psf == "gaussian":
        notes.append("2D Gaussian PSF: matched and scored laterally (no axial threshold); axial columns empty.")
    if model is not None:
        lo, hi = per_density[0], per_density[-1]
        for method in ("ours", REFINED):
            if method not in lo["photon_quartiles"]:
                continue
            ratios = [b["rmse_over_crlb"] for b in lo["photon_quartiles"][method]]
            verdict = ("undefined (a quartile without matches or bound)" if not np.isfinite(ratios).all()
                       else "yes" if all(r <= CHECK_QUARTILE_RATIO for r in ratios) else "no")
            notes.append(f"Check, low density ({lo['density_per_um2']:g}/um^2): {method} rmse_over_crlb per photon "
                         f"quartile {', '.join(f'{r:.2f}' for r in ratios)}, all <= {CHECK_QUARTILE_RATIO}: "
                         f"{verdict}.")
        if run_cfg.psf != "gaussian" and ORACLE in lo["metrics"]:
            ours_e, oracle_e = lo["metrics"]["ours"]["effcy_vol"], lo["metrics"][ORACLE]["effcy_vol"]
            verdict = "yes" if oracle_e - ours_e <= CHECK_EFFCY_GAP else "no"
            notes.append(f"Check, low density: ours effcy_vol {ours_e:.3f} vs the CRLB oracle's {oracle_e:.3f}, "
                         f"within {CHECK_EFFCY_GAP}: {verdict}.")
        ours_j, cls_j = hi["metrics"]["ours"]["jaccard"], hi["metrics"]["classical"]["jaccard"]
        notes.append(f"Check, high density ({hi['density_per_um2']:g}/um^2): ours Jaccard {ours_j:.3f} "
                     f">= {CHECK_HIGH_JACCARD}: {'yes' if ours_j >= CHECK_HIGH_JACCARD else 'no'}; classical "
                     f"{cls_j:.3f}, ours ahead: {'yes' if ours_j > cls_j else 'no'}.")
    report("smlm_quality", "SMLM localisation: trained network vs classical fitter", info,
           [table(rows, COLUMNS, formats=FORMATS),
            table(quartile_rows, QUARTILE_COLUMNS, title="By photon quartile of the ground truth", formats=FORMATS)],
           notes, flags.out,
           extra={"simulation": run_cfg.to_dict(), "checkpoint": flags.checkpoint, "raw_th": raw_th,
                  "img_size": list(img_size), "frames": flags.frames, "seed": flags.seed, "movies": movies,
                  "per_density": per_density})


if __name__ == "__main__":
    main()
