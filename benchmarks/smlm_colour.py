"""Two-colour SMLM quality and speed: trained train_smlm_colour.py runs against a classical route on fixed
two-colour test movies at a low and a high density.

    python benchmarks/smlm_colour.py --checkpoints runs/smlm_colour/cpu --out bench_out
    python benchmarks/smlm_colour.py --checkpoints runs/smlm_colour/cpu runs/smlm_colour/nocurriculum \
        runs/smlm_colour/student --out bench_out                 # curriculum and distillation side by side

Test movies: the first run's simulation (its simulation.yaml, curriculum dropped) with only the density
changed (--densities, emitters per um^2 per frame), one movie of --frames frames per density simulated on the
CPU from a seed derived from (--seed, density), written to <out>/smlm_colour_movies/ (data.smlm.colour
write_colour_h5) and reused while the file's config, seed and length match. Every run must share that
simulation's cameras and channels (checked), so all methods see the same photons.

Methods, on the photon frames (for the networks, channel 2 resampled onto channel 1's grid with the registration):
- each run: fit_smlm_colour.localise_colour at the run's detection threshold (val/raw_th of the loaded
  export) and dye assignment at --min_confidence (default: each run's own).
- classical: benchmarks/smlm_classical.fit_movie on each channel's frames as its camera recorded them, with
  that channel's camera and PSF (its defaults: 5-sigma matched-filter detection, Poisson MLE), channel 2's
  localisations mapped onto channel 1's grid with the registration, the two merged within 1 px
  (models/double_munet_post.merge_channel_detections, equal weights), ratio = ch1 / (ch1 + ch2) of the fitted
  photons (an emitter seen in one channel only gets 0 or 1), dye by the same maximum-likelihood rule with the
  measurement sigma of the ratio's shot noise, sqrt(r (1 - r) / N), at least 1 / N (N the fitted total
  photons; an emitter found in one channel only has r = 0 or 1).
Metrics (metrics.smlm_colour.colour_scores): the merged localisations' Jaccard and lateral RMSE, per channel
Jaccard, ratio RMSE and bias and the z-score spread of the matched localisations, colour accuracy, crosstalk
(wrong dye among the assigned) and the rejected fraction (unassigned among the matched). Speed: frames/s of
one call over the whole movie after a 4-frame warm-up (the network on --device, both channels; the classical
route: both channels' fits and the merge). Parameters: trainable parameters of each network.
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
from benchmarks.smlm_classical import fit_movie
from data.smlm.colour import (ColourConfig, colour_ground_truth, read_colour_h5, register_channel2,
                              simulate_colour_movie, write_colour_h5)
from fit_smlm_colour import load_colour_fitter, localise_colour
from metrics.smlm_colour import colour_scores
from models.double_munet_post import merge_channel_detections, ratio_from_photons
from training import UsageError

COLUMNS = ["density", "method", "params", "jaccard", "rmse_lat", "ch1/jaccard", "ch2/jaccard", "ratio_rmse",
           "ratio_bias", "ratio_z_std", "colour_accuracy", "crosstalk", "rejected", "frames_per_s"]


TIMING_REPEATS = 5

def with_density(cfg: ColourConfig, density: float) -> ColourConfig:
    ch1, ch2 = (dataclasses.replace(ch, emitter_av=None, emitter_density=density) for ch in cfg.channels)
    return dataclasses.replace(cfg, channel1=ch1, channel2=ch2, curriculum=())


def test_movie(cfg: ColourConfig, n_frames: int, base_seed: int, folder: Path):
    """The movie of cfg at its density (simulated once, then read back from `folder`)."""
    density = cfg.channel1.emitter_density
    seed = int(np.random.SeedSequence([base_seed, round(density * 1e6)]).generate_state(1)[0] & 0x7FFFFFFF)
    h, w = cfg.img_size
    path = folder / f"smlm_colour_test_{h}x{w}_T{n_frames}_d{density:g}_seed{base_seed}.h5"
    if path.is_file():
        try:
            movie, stored, meta = read_colour_h5(path)
            if stored == cfg and meta["seed"] == seed and meta["n_frames"] == n_frames:
                return movie
        except ValueError:
            pass
        print(f"  {path}: other config, seed or length; simulating again", flush=True)
    movie = simulate_colour_movie(cfg, n_frames, torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    write_colour_h5(path, movie, cfg, mode="test", seed=seed)
    return movie


def timed(fn, frames: torch.Tensor, repeats: int = TIMING_REPEATS):
    """fn(frames) and its median wall time over `repeats` calls (a short movie fits in about a second, so a
    single reading moves by 10-20 % with the machine); a 4-frame call first warms up."""
    fn(frames[:, :4])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(frames)
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def classical(frames: torch.Tensor, cfg: ColourConfig) -> dict:
    """Both channels fitted by the classical MLE fitter on their own cameras' frames (2, T, H, W) photons, as
    recorded (resampling channel 2 would correlate its noise and widen its PSF, which the fitter's model does
    not know), channel 2's localisations mapped onto channel 1's grid with the registration, then merged."""
    scale = np.array([*cfg.channel1.px_size_nm, 1.0])
    dets = []
    for c, ch in enumerate(cfg.channels):
        d = fit_movie(frames[c], ch)
        if c == 1:
            xy = cfg.registration.to_channel1(torch.from_numpy(d["xyz_px"][:, :2]).double())
            d["xyz_px"] = np.column_stack([xy.numpy(), d["xyz_px"][:, 2]])
        dets.append({**d, "xyz_nm": d["xyz_px"] * scale})
    merged = merge_channel_detections(dets[0], dets[1], merge_radius_px=1.0)
    merged["xyz_nm"] = merged["xyz_px"] * scale
    merged["ratio"] = ratio_from_photons(merged["phot_ch"])
    n = np.maximum(merged["phot"], 1.0)
    merged["ratio_sigma"] = np.maximum(np.sqrt(merged["ratio"] * (1 - merged["ratio"]) / n), 1.0 / n)
    return {"ch1": dets[0], "ch2": dets[1], "merged": merged}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="train_smlm_colour.py runs or exports")
    p.add_argument("--densities", default="0.5,2.0", help="emitters per um^2 per frame, comma-separated")
    p.add_argument("--frames", type=int, default=256, help="frames per test movie")
    p.add_argument("--seed", type=int, default=7, help="base seed of the test movies")
    p.add_argument("--min_confidence", type=float, default=None, help="default: each run's own")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_classical", action="store_true", help="skip the classical route")
    p.add_argument("--out", default=None, help="folder for the .md/.json report and the test movies")
    args = p.parse_args()
    positive("--frames", args.frames, 4)
    densities = float_list(args.densities, "--densities", strict=True)
    device = torch.device(args.device)
    info = print_header("Two-colour SMLM quality")
    runs = []
    try:
        for path in args.checkpoints:
            model, cfg, settings = load_colour_fitter(path, device)
            runs.append((Path(path).name, model, cfg, settings))
    except UsageError as e:
        sys.exit(f"smlm_colour.py: error: {e}")
    base = runs[0][2]
    for name, _, cfg, _ in runs[1:]:
        if dataclasses.replace(cfg, curriculum=()) != dataclasses.replace(base, curriculum=()):
            sys.exit(f"smlm_colour.py: error: run {name} was trained on another simulation than {runs[0][0]}")
    folder = Path(args.out or "bench_out") / "smlm_colour_movies"
    rows = []
    for density in densities:
        cfg = with_density(base, density)
        movie = test_movie(cfg, args.frames, args.seed, folder)
        gt = colour_ground_truth(movie, cfg)
        frames = torch.stack([movie.frames[0], register_channel2(movie.frames[1], cfg.registration)])
        print(f"density {density:g}/um^2: {args.frames} frames, {len(gt['phot'])} emitters", flush=True)
        for name, model, run_cfg, settings in runs:
            conf = settings.min_confidence if args.min_confidence is None else args.min_confidence
            det, seconds = timed(lambda f: localise_colour(model, f, cfg, settings.window, settings.raw_th,
                                                           args.batch_size, device, conf), frames)
            m = colour_scores(det, gt, cfg.dye_means, cfg.dye_spreads, cfg.dye_priors, conf)
            rows.append({"density": density, "method": name, "params": sum(q.numel() for q in model.parameters()),
                         **{k: m[k] for k in COLUMNS[3:-1]}, "frames_per_s": args.frames / seconds})
        if not args.no_classical:
            conf = runs[0][3].min_confidence if args.min_confidence is None else args.min_confidence
            det, seconds = timed(lambda f: classical(f, cfg), movie.frames)
            m = colour_scores(det, gt, cfg.dye_means, cfg.dye_spreads, cfg.dye_priors, conf)
            rows.append({"density": density, "method": "classical", "params": 0,
                         **{k: m[k] for k in COLUMNS[3:-1]}, "frames_per_s": args.frames / seconds})
    notes = [f"test movies: {args.frames} frames of {base.img_size[0]}x{base.img_size[1]} px per density, "
             f"seed {args.seed}; dyes {', '.join(f'{d.ratio_mean:g} +- {d.ratio_spread:g}' for d in base.dyes)}",
             "crosstalk = wrong dye among the assigned matched localisations; rejected = unassigned among the "
             "matched ones; ratio_z_std = std of (predicted - true ratio) / predicted sigma (1: calibrated)",
             f"frames_per_s: the movie's frames over the median wall time of {TIMING_REPEATS} fits of the whole movie "
             "(network: detection, merging and colour assignment; classical: both channels, matching, ratio)"]
    report("smlm_colour", "Two-colour SMLM quality", info,
           [table(rows, COLUMNS, fmt=".3f", formats={"density": "g", "params": ",d", "frames_per_s": ".1f",
                                                     "rmse_lat": ".1f", "ratio_z_std": ".2f"})], notes, args.out)


if __name__ == "__main__":
    main()
