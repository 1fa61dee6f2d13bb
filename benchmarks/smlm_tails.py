"""Where the lateral error of a trained SMLM run comes from: its matched localisations split by the conditions
that can spoil a localisation, with each group's share of the summed squared error.

    python benchmarks/smlm_tails.py --checkpoint runs/smlm/<run> --out bench_out
    python benchmarks/smlm_tails.py --checkpoint runs/smlm/<run> --density 0.5 --sigma_filter --out bench_out
    python benchmarks/smlm_tails.py --checkpoint runs/smlm/<run> --classical --out bench_out    # the classical fitter
    python benchmarks/smlm_tails.py --checkpoint runs/smlm/<run> --refine --out bench_out       # fit_smlm.py --refine

The test movie is the one benchmarks/smlm_quality.py simulates for the same --img_size, --frames, --density and
--seed (the run's simulation with only the density and the frame size changed; reused from <out>/smlm_movies/).
The network localises it with fit_smlm.localise at the run's threshold, and its detections are matched to the
ground truth as in the quality benchmark (250 nm lateral, 500 nm axial, greedy per frame).

Each matched pair (prediction, ground-truth emitter) is put in one bin of every factor below; a row gives the
pairs in the bin, their lateral RMSE, median error and rmse_over_crlb (each emitter's own single-frame bound,
metrics.smlm_crlb), the fraction with an error above 3 times the bound, and the bin's share of the summed
squared lateral error of all pairs: a bin with 10 % of the pairs and 40 % of the squared error is where the
RMSE goes.

    photons         the emitter's photons in the frame, by quartile of the matched emitters
    edge distance   px from the emitter to the nearest frame edge (the PSF is cut there)
    neighbour       px to the nearest other emitter in the same frame, any brightness (overlapping PSFs)
    blinking nbr    another emitter within 4 px that is on in frame t-1 or t+1 but not in t: the network's
                    3-frame window sees a spot that is absent from the frame it localises
    on in t-1/t+1   whether the emitter itself is on in both neighbouring frames (full frame, 3 looks at it)
                    or not (its first or last frame: partial photons, fewer looks; always "not both" in the
                    movie's first and last frame)
    |z|             nm from the focal plane (the widest astigmatic spots at the ends of the range)
    offset          |predicted offset| from the centre of the pixel the detection was read from, max over x, y:
                    beyond 0.5 px the detection sits on a neighbouring pixel; tanh limits it to 1 px
    partner         whether the ground-truth emitter nearest to the prediction (any brightness) is the one it
                    was matched to
    single emitter  the case the single-emitter bound describes: >= 4 px from the edge, no other emitter within
                    8 px, |z| < 300 nm; split into the brightest photon quartile and the rest, and all others
    split           another prediction in the same frame within 1 px of the matched one (one emitter read twice,
                    or two emitters close together)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import dataclasses

import numpy as np
import torch

from benchmarks.common import positive, print_header, report, table
from benchmarks.smlm_classical import fit_movie
from benchmarks.smlm_quality import image_size, match, test_movie
from fit_smlm import load_fitter, localise
from metrics.smlm_crlb import ground_truth
from models.sigma_munet_post import MAX_SIGMA_XY_NM, MAX_SIGMA_Z_NM, filter_by_sigma
from training import UsageError
from training.config import fail

COLUMNS = ["factor", "bin", "pairs", "% pairs", "rmse_lat_nm", "median_lat_nm", "rmse_over_crlb", "% > 3 CRLB",
           "% sq err"]
FORMATS = {"% pairs": ".1f", "rmse_lat_nm": ".1f", "median_lat_nm": ".1f", "% > 3 CRLB": ".1f", "% sq err": ".1f"}
BLINK_RADIUS_PX = 4.0


def _nearest(points: np.ndarray, frames: np.ndarray, query: np.ndarray, query_frames: np.ndarray,
             exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distance px, index into points) of the nearest point of the same frame for every query row; inf / -1
    when there is none. exclude (Q,) drops one index per query (the query itself)."""
    dist = np.full(len(query), np.inf)
    idx = np.full(len(query), -1, dtype=np.int64)
    for f in np.unique(query_frames):
        q = np.flatnonzero(query_frames == f)
        p = np.flatnonzero(frames == f)
        if not len(p):
            continue
        d = np.hypot(*(query[q, None, :2] - points[None, p, :2]).transpose(2, 0, 1))
        if exclude is not None:
            d[exclude[q, None] == p[None, :]] = np.inf
        k = d.argmin(1)
        dist[q], idx[q] = d[np.arange(len(q)), k], np.where(np.isfinite(d[np.arange(len(q)), k]), p[k], -1)
    return dist, idx


def pair_factors(det: dict, pred_idx: np.ndarray, gt_idx: np.ndarray, gt: dict, movie, cfg) -> dict:
    """{factor: (bin labels (n_pairs,), bin order)} for the matched pairs; factors in the module docstring."""
    h, w = cfg.img_size
    em = movie.emitters
    all_xyz = em.xyz.numpy().astype(np.float64)
    all_frame, all_id = em.frame_ix.numpy(), em.id.numpy()
    rows = gt["row"][gt_idx]                                   # the matched emitters' rows in movie.emitters
    xyz, frame, ids = all_xyz[rows], all_frame[rows], all_id[rows]
    phot = gt["phot"][gt_idx]

    def bins(values, edges, labels):
        return np.asarray(labels)[np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(labels) - 1)]

    q = np.quantile(phot, [0, 0.25, 0.5, 0.75, 1.0])
    photon_labels = [f"Q{k + 1} {q[k]:.0f}-{q[k + 1]:.0f}" for k in range(4)]
    edge = np.minimum.reduce([xyz[:, 0] + 0.5, w - 0.5 - xyz[:, 0], xyz[:, 1] + 0.5, h - 0.5 - xyz[:, 1]])
    nbr, _ = _nearest(all_xyz, all_frame, xyz, frame, exclude=rows)
    on = {(int(f), int(i)) for f, i in zip(all_frame, all_id)}
    both = np.array([(f - 1, i) in on and (f + 1, i) in on for f, i in zip(frame, ids)])
    # Blinking neighbours: emitters on in t-1 or t+1 whose id is not on in t.
    blink = np.zeros(len(rows), dtype=bool)
    for shift in (-1, 1):
        mask = np.array([(f - shift, i) not in on for f, i in zip(all_frame, all_id)])
        d, _ = _nearest(all_xyz[mask], all_frame[mask] - shift, xyz, frame)
        blink |= d <= BLINK_RADIUS_PX
    offset = np.abs(det["xyz_px"][pred_idx, :2] - det["pixel"][pred_idx][:, ::-1]).max(1)
    _, nearest_gt = _nearest(all_xyz, all_frame, det["xyz_px"][pred_idx], det["frame_ix"][pred_idx])
    other_pred, _ = _nearest(det["xyz_px"], det["frame_ix"], det["xyz_px"][pred_idx], det["frame_ix"][pred_idx],
                             exclude=pred_idx)
    factors = {
        "photons": (bins(phot, q[:-1], photon_labels), photon_labels),
        "edge distance": (bins(edge, [0, 1, 2, 4], ["< 1 px", "1-2 px", "2-4 px", ">= 4 px"]),
                          ["< 1 px", "1-2 px", "2-4 px", ">= 4 px"]),
        "neighbour": (bins(nbr, [0, 2, 4, 8], ["< 2 px", "2-4 px", "4-8 px", ">= 8 px"]),
                      ["< 2 px", "2-4 px", "4-8 px", ">= 8 px"]),
        "blinking nbr": (np.where(blink, f"within {BLINK_RADIUS_PX:g} px", "none"),
                         [f"within {BLINK_RADIUS_PX:g} px", "none"]),
        "on in t-1/t+1": (np.where(both, "both (full frame)", "not both"), ["both (full frame)", "not both"]),
        "offset": (bins(offset, [0, 0.5, 0.9], ["< 0.5 px", "0.5-0.9 px", ">= 0.9 px"]),
                   ["< 0.5 px", "0.5-0.9 px", ">= 0.9 px"]),
        "partner": (np.where(nearest_gt == rows, "nearest", "another is nearer"), ["nearest", "another is nearer"]),
        "split": (np.where(other_pred <= 1.0, "2nd prediction < 1 px", "none"), ["2nd prediction < 1 px", "none"]),
    }
    if cfg.psf != "gaussian":
        factors["|z|"] = (bins(np.abs(xyz[:, 2]), [0, 300, 600], ["< 300 nm", "300-600 nm", ">= 600 nm"]),
                          ["< 300 nm", "300-600 nm", ">= 600 nm"])
    # The case the single-emitter bound describes: nothing else within 8 px, whole spot in the frame, in focus.
    single = (edge >= 4) & (nbr >= 8) & ((np.abs(xyz[:, 2]) < 300) if cfg.psf != "gaussian" else True)
    bright = phot >= q[3]
    order = ["single, Q4", "single, Q1-Q3", "not single"]
    factors["single emitter"] = (np.where(single, np.where(bright, order[0], order[1]), order[2]), order)
    return factors


def factor_rows(factors: dict, sq_err: np.ndarray, crlb: np.ndarray) -> list[dict]:
    total = sq_err.sum()
    out = [{"factor": "all", "bin": "", **_group(np.ones(len(sq_err), dtype=bool), sq_err, crlb, total)}]
    for name, (labels, order) in factors.items():
        for label in order:
            members = labels == label
            if members.any():
                out.append({"factor": name, "bin": label, **_group(members, sq_err, crlb, total)})
    return out


def _group(members: np.ndarray, sq_err: np.ndarray, crlb: np.ndarray, total: float) -> dict:
    e, c = sq_err[members], crlb[members]
    return {"pairs": int(members.sum()), "% pairs": 100.0 * members.mean(), "rmse_lat_nm": float(np.sqrt(e.mean())),
            "median_lat_nm": float(np.median(np.sqrt(e))),
            "rmse_over_crlb": float(np.sqrt(e.mean() / np.mean(c**2))),
            "% > 3 CRLB": 100.0 * float(np.mean(np.sqrt(e) > 3 * c)), "% sq err": 100.0 * float(e.sum() / total)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train_smlm.py run directory")
    p.add_argument("--weights", default="best", choices=("best", "final"), help="which export of the run")
    p.add_argument("--out", default="bench_out", help="folder for smlm_tails.md/.json and smlm_movies/")
    p.add_argument("--frames", type=int, default=256, help="frames of the test movie")
    p.add_argument("--img_size", default="64", help="frame size in px: 64 or H,W")
    p.add_argument("--density", type=float, default=0.1, help="emitters per um^2 per frame")
    p.add_argument("--seed", type=int, default=0, help="test-movie seed, as in smlm_quality.py")
    p.add_argument("--raw_th", type=float, default=None, help="detection threshold (default: the run's)")
    p.add_argument("--sigma_filter", action="store_true",
                   help=f"drop detections with predicted sigma x or y > {MAX_SIGMA_XY_NM:g} nm or z > "
                        f"{MAX_SIGMA_Z_NM:g} nm first")
    p.add_argument("--batch_size", type=int, default=32, help="frames per forward pass")
    p.add_argument("--refine", action="store_true",
                   help="refit the network's detections by maximum likelihood first (fit_smlm.py --refine)")
    p.add_argument("--classical", action="store_true",
                   help="split the errors of the classical fitter (benchmarks/smlm_classical.py) instead, on the "
                        "same movie (--checkpoint gives the simulation)")
    flags = p.parse_args()
    positive("--frames", flags.frames, 4)
    positive("--batch_size", flags.batch_size)
    if not flags.density > 0:
        fail(f"--density {flags.density}: expected a number > 0")
    try:
        model, run_cfg, settings = load_fitter(flags.checkpoint, flags.weights, "cpu")
    except (UsageError, ValueError) as e:
        fail(str(e))
    raw_th = flags.raw_th if flags.raw_th is not None else settings.raw_th
    if raw_th is None:
        fail(f"--checkpoint {flags.checkpoint}: its {flags.weights} export has no val/raw_th; pass --raw_th")
    try:
        cfg = dataclasses.replace(run_cfg, img_size=image_size(flags.img_size), emitter_av=None,
                                  emitter_density=flags.density)
    except ValueError as e:
        fail(f"--img_size/--density: {e}")
    info = print_header("SMLM: where the lateral error comes from")
    movie, path, cfg = test_movie(cfg, flags.frames, flags.seed, Path(flags.out) / "smlm_movies")
    gt = ground_truth(movie, cfg)
    if flags.classical:
        det = fit_movie(movie.frames, cfg)
        det["pixel"] = np.round(det["xyz_px"][:, 1::-1]).astype(np.int64)  # its own pixel (row, col): offset < 0.5
    else:
        with torch.no_grad():
            det = localise(model, movie.frames, cfg, window=settings.window, raw_th=raw_th,
                           batch_size=flags.batch_size, refine=flags.refine)
    if flags.sigma_filter:
        det = filter_by_sigma(det)
    pred_nm, gt_nm, _, (pred_idx, gt_idx) = match(det, gt, cfg)
    if not len(pred_idx):
        fail(f"--checkpoint {flags.checkpoint}: no detection matched on {path}")
    sq_err = ((pred_nm[pred_idx, :2] - gt_nm[gt_idx, :2]) ** 2).sum(1)
    crlb = gt["crlb_lat_nm"][gt_idx]
    rows = factor_rows(pair_factors(det, pred_idx, gt_idx, gt, movie, cfg), sq_err, crlb)
    for r in rows:
        print(f"  {r['factor']:>14} {r['bin']:>22}: {r['pairs']:6d} pairs ({r['% pairs']:5.1f} %), RMSE "
              f"{r['rmse_lat_nm']:6.1f} nm, {r['rmse_over_crlb']:5.2f} x CRLB, {r['% sq err']:5.1f} % of sq err")
    notes = [("Classical fitter (benchmarks/smlm_classical.py) on the simulation of " if flags.classical else "")
             + f"Run {flags.checkpoint} ({flags.weights}), raw_th {raw_th}"
             + (", MLE refinement on" if flags.refine and not flags.classical else "")
             + (", sigma filter on" if flags.sigma_filter else "") + f"; movie {path} ({flags.frames} frames, "
             f"{cfg.img_size[0]}x{cfg.img_size[1]} px, {flags.density:g} emitters/um^2, seed {flags.seed}).",
             f"{len(gt['phot'])} ground-truth emitters, {len(det['frame_ix'])} detections, {len(pred_idx)} matched.",
             "% sq err: the bin's share of the summed squared lateral error of all matched pairs; % > 3 CRLB: "
             "pairs whose lateral error exceeds 3 times their own bound. Factors: the module docstring."]
    report("smlm_tails", "SMLM: lateral error by condition", info, [table(rows, COLUMNS, formats=FORMATS)],
           notes, flags.out, extra={"checkpoint": flags.checkpoint, "raw_th": raw_th, "movie": str(path),
                                    "density": flags.density, "sigma_filter": flags.sigma_filter,
                                    "refine": flags.refine and not flags.classical})


if __name__ == "__main__":
    main()
