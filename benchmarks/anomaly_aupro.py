"""AUPRO speed and memory: the exact vectorised metric against a binned sweep and a brute-force definition.

    python benchmarks/anomaly_aupro.py [--maps 100,400,1725 --size 224 --steps 100 --repeat 2] [--out bench_out]

The full MVTec AD test set is 1725 maps of 224 x 224 (87 M pixels), 73 % of them defective. Synthetic maps of
that shape are made here: UniAD-like float32 maps (a 14 x 14 random field upsampled bilinearly, align_corners,
so nearly every pixel has its own score) plus a bump over each defect, and masks from thresholded smooth blobs
(several regions per defective image, some touching). Measured per number of maps:

- exact: ``metrics.anomaly.aupro`` (every distinct score a threshold; one sort of the pixels that can matter
  below the FPR limit), seconds (best of --repeat) and the peak of numpy allocations during one call (tracemalloc,
  MiB, inputs excluded);
- binned: a straightforward sweep of --steps thresholds evenly spaced between the minimum and maximum score
  (as ADer's ``max_step_aupro=100``), each a pass over all pixels with a per-region bincount, integrated with the
  same rule; its seconds and its error against the exact value;
- brute force (a small case only, --brute_maps maps of --brute_size px): PRO and FPR computed at every distinct
  score straight from the definition; must equal the exact value to ~1e-12.
With --with_metrics the largest size also times ``anomaly_metrics`` (15 categories: image AUROC x 3 scores,
pixel AUROC through scikit-learn, AUPRO), the cost of one evaluation of train_anomaly.py on MVTec AD.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import time
import tracemalloc
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from benchmarks.common import int_list, positive, print_header, report, table
from metrics.anomaly import CONNECTIVITY, FPR_LIMIT, anomaly_metrics, area_to_limit, aupro

DEFECTIVE_FRACTION = 1258 / 1725     # MVTec AD test set (reference/anomaly.md §2.1)
N_CATEGORIES = 15


def synthetic_maps(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, size, size), masks bool (n, size, size)); built in chunks to keep the peak low."""
    g = torch.Generator().manual_seed(seed)
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    defective = torch.rand(n, generator=g) < DEFECTIVE_FRACTION
    for start in range(0, n, 128):
        stop = min(n, start + 128)
        field = F.interpolate(torch.rand(stop - start, 1, 14, 14, generator=g), size=size, mode="bilinear",
                              align_corners=True)[:, 0]
        blobs = F.interpolate(torch.rand(stop - start, 1, 7, 7, generator=g), size=size, mode="bilinear",
                              align_corners=True)[:, 0]
        mask = (blobs > 0.8) & defective[start:stop, None, None]
        maps[start:stop] = (field + 0.6 * mask.float() * blobs).numpy()
        masks[start:stop] = mask.numpy()
    return maps, masks


def binned_aupro(maps: np.ndarray, masks: np.ndarray, steps: int, fpr_limit: float) -> float:
    """PRO and FPR at `steps` evenly spaced thresholds, one pass over every pixel per threshold."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        lab, n = ndimage.label(masks[i], structure=CONNECTIVITY)
        labels[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    anomalous_scores, anomalous_labels = maps[masks], labels[masks]
    normal_scores = maps[~masks]
    sizes = np.bincount(anomalous_labels, minlength=n_regions + 1)[1:]
    fpr, pro = [0.0], [0.0]
    for t in np.linspace(maps.max(), maps.min(), steps):
        admitted = anomalous_scores >= t
        overlap = np.bincount(anomalous_labels[admitted], minlength=n_regions + 1)[1:] / sizes
        fpr.append(np.count_nonzero(normal_scores >= t) / normal_scores.size)
        pro.append(overlap.mean())
    return area_to_limit(np.array(fpr), np.array(pro), fpr_limit)


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=CONNECTIVITY)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        admitted = maps >= t
        fpr.append((admitted & ~masks).sum() / (~masks).sum())
        pro.append(np.mean([admitted[i][r].mean() for i, r in regions]))
    return area_to_limit(np.array(fpr), np.array(pro), fpr_limit)


def timed_best(fn, repeat: int) -> tuple[float, float]:
    """(value, best seconds of `repeat` calls)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def peak_mib(fn) -> float:
    """Peak of the allocations made during fn() (numpy reports its buffers to tracemalloc), MiB."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--maps", default="100,400,1725", help="numbers of maps to time (1725 = MVTec AD test set)")
    p.add_argument("--size", type=int, default=224, help="map side in px")
    p.add_argument("--steps", type=int, default=100, help="thresholds of the binned sweep (0 = skip it)")
    p.add_argument("--binned_max_maps", type=int, default=100_000, help="skip the binned sweep above this many maps")
    p.add_argument("--repeat", type=int, default=2, help="timed calls per method (best is reported)")
    p.add_argument("--fpr_limit", type=float, default=FPR_LIMIT, help="AUPRO integration limit")
    p.add_argument("--brute_maps", type=int, default=6, help="maps of the brute-force check (0 = skip)")
    p.add_argument("--brute_size", type=int, default=24, help="map side of the brute-force check in px")
    p.add_argument("--with_metrics", action="store_true", help="also time anomaly_metrics on the largest size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for anomaly_aupro.md/.json")
    flags = p.parse_args()
    sizes = int_list(flags.maps, "--maps", minimum=1)
    positive("--size", flags.size)
    positive("--repeat", flags.repeat)
    positive("--steps", flags.steps, 0)
    positive("--brute_maps", flags.brute_maps, 0)
    info = print_header("AUPRO: exact vectorised vs binned sweep")

    rows = []
    for n in sizes:
        maps, masks = synthetic_maps(n, flags.size, flags.seed)
        exact, exact_s = timed_best(lambda: aupro(maps, masks, flags.fpr_limit), flags.repeat)
        row = {"maps": n, "size": f"{flags.size}x{flags.size}", "mpixels": maps.size / 1e6,
               "regions": int(sum(ndimage.label(m, structure=CONNECTIVITY)[1] for m in masks)),
               "exact_s": exact_s, "exact_peak_mib": peak_mib(lambda: aupro(maps, masks, flags.fpr_limit)),
               "input_mib": (maps.nbytes + masks.nbytes) / 2**20, "aupro": exact}
        if flags.steps and n <= flags.binned_max_maps:
            binned, binned_s = timed_best(lambda: binned_aupro(maps, masks, flags.steps, flags.fpr_limit),
                                          flags.repeat)
            row.update(binned_s=binned_s, binned_abs_err=abs(binned - exact))
        if flags.with_metrics and n == max(sizes):
            categories = np.arange(n) % N_CATEGORIES
            labels = masks.reshape(n, -1).any(axis=1)
            names = [f"c{i}" for i in range(N_CATEGORIES)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                _, row["anomaly_metrics_s"] = timed_best(
                    lambda: anomaly_metrics(maps, masks, labels, categories, names), 1)
        rows.append(row)
        print(f"  {n} maps: exact {exact_s:.2f} s, AUPRO {exact:.4f}"
              + (f", binned {row['binned_s']:.2f} s (error {row['binned_abs_err']:.1e})" if "binned_s" in row else ""),
              flush=True)
        del maps, masks

    tables = [table(rows, ["maps", "size", "mpixels", "regions", "input_mib", "exact_s", "exact_peak_mib",
                           "binned_s", "binned_abs_err", "anomaly_metrics_s", "aupro"],
                    f"AUPRO (FPR limit {flags.fpr_limit}) on synthetic float32 maps",
                    formats={"mpixels": ".1f", "input_mib": ".0f", "exact_peak_mib": ".0f", "binned_abs_err": ".1e",
                             "aupro": ".4f"})]
    notes = [f"exact_peak_mib: peak numpy allocations during one aupro call, above the inputs (input_mib); "
             f"binned: {flags.steps} evenly spaced thresholds, same integration rule; best of {flags.repeat} calls.",
             "Maps: 14 x 14 uniform field upsampled bilinearly to the map size plus 0.6 x a smooth blob over each "
             f"defect; {DEFECTIVE_FRACTION:.0%} of the maps defective (MVTec AD's share)."]
    if flags.brute_maps:
        small_maps, small_masks = synthetic_maps(flags.brute_maps, flags.brute_size, flags.seed + 1)
        small_masks[0] = False                                                 # at least one normal map
        exact = aupro(small_maps, small_masks, flags.fpr_limit)
        brute, brute_s = timed_best(lambda: brute_force_aupro(small_maps, small_masks, flags.fpr_limit), 1)
        brute_row = {"maps": flags.brute_maps, "size": f"{flags.brute_size}x{flags.brute_size}",
                     "thresholds": len(np.unique(small_maps)), "exact": exact, "brute_force": brute,
                     "abs_diff": abs(exact - brute), "brute_s": brute_s}
        tables.append(table([brute_row], list(brute_row), "Exact AUPRO against the brute-force definition",
                            formats={"exact": ".10f", "brute_force": ".10f", "abs_diff": ".1e"}))
        notes.append("Brute force: PRO and FPR at every distinct score, one pass per threshold and region.")
    report("anomaly_aupro", "AUPRO speed and memory", info, tables, notes, flags.out)


if __name__ == "__main__":
    main()
