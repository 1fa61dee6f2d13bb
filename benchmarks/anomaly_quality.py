"""UniAD (a trained train_anomaly.py run) against a PatchCore-style baseline on the same frozen features.

    python benchmarks/anomaly_quality.py --checkpoint runs/anomaly/cpu [--coreset 0.1] [--out bench_out]

Both methods see exactly the same features: the run's frozen backbone and MFCN neck (``feature_align``) of the
run's own training images (``train/good`` minus the validation split, rebuilt from the run's args.yaml).
UniAD rebuilds each test image's features with its transformer; the anomaly map is the L2 norm of the error
and the image score the max of its avg-pooled map (the run's --score_pool). PatchCore (Roth et al., 2022) keeps
one memory bank per category, so unlike UniAD it is told each test image's category: every training position's
feature, averaged over its 3 x 3 neighbourhood (PatchCore's locally aware patch features), greedily subsampled
to ``--coreset`` of the bank by k-centre selection (in a 128-dimensional random projection, as PatchCore does,
distances then taken in the full space); a test position's score is its distance to the nearest bank entry,
the map is upsampled like UniAD's and smoothed by a Gaussian of sigma 4 px, and the image score is the largest
position score. Per category and mean: image AUROC, pixel AUROC, AUPRO (FPR <= 0.3), from metrics/anomaly.py;
and inference images/s of both on the cached features (the backbone's share, the same for both, is reported
once).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch.utils.data import DataLoader

from benchmarks.common import print_header, report, table
from data.anomaly import AnomalyDataset, load_splits
from metrics.anomaly import anomaly_map, anomaly_metrics, auroc
from training.config import UsageError, fail
from training.export import load_export, resolve_device


@torch.no_grad()
def features(model, records, categories, input_size: int, device, batch_size: int = 32) -> dict:
    """feature_align (N, C, h, w) on the CPU and the items' mask, has_mask, label, category of the records."""
    loader = DataLoader(AnomalyDataset(records, categories, input_size), batch_size=batch_size)
    out = {k: [] for k in ("features", "mask", "has_mask", "label", "category")}
    for batch in loader:
        out["features"].append(model.features(batch["image"].to(device)).cpu())
        for k in ("mask", "has_mask", "label", "category"):
            out[k].append(batch[k])
    out = {k: torch.cat(v) for k, v in out.items()}
    out["mask"] = out["mask"][:, 0]
    return out


def coreset(bank: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-centre subset of ``bank`` (M, C): each pick is the entry farthest from those picked
    so far, measured in a fixed 128-dimensional Gaussian random projection."""
    n = max(1, round(fraction * len(bank)))
    if n >= len(bank):
        return torch.arange(len(bank))
    g = torch.Generator().manual_seed(seed)
    proj = bank @ torch.randn(bank.shape[1], 128, generator=g) / 128 ** 0.5 if bank.shape[1] > 128 else bank
    chosen = [int(torch.randint(len(bank), (1,), generator=g))]
    dist = torch.cdist(proj, proj[chosen]).squeeze(1)
    for _ in range(n - 1):
        chosen.append(int(dist.argmax()))
        dist = torch.minimum(dist, torch.cdist(proj, proj[chosen[-1:]]).squeeze(1))
    return torch.tensor(chosen)


def local_patches(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h, w, C): each position averaged with its 3 x 3 neighbours (PatchCore's aggregation)."""
    return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False).permute(0, 2, 3, 1)


def patchcore_maps(train: dict, test: dict, categories, fraction: float, input_size: int) -> tuple[np.ndarray, np.ndarray,
                                                                                                    float, float]:
    """(maps (N, H, W), image scores (N,), seconds to build the banks, seconds to score the test features)."""
    start = time.perf_counter()
    banks = {}
    for cid in range(len(categories)):
        patches = local_patches(train["features"][train["category"] == cid]).reshape(-1, train["features"].shape[1])
        banks[cid] = patches[coreset(patches, fraction)]
    build = time.perf_counter() - start
    start = time.perf_counter()
    patches = local_patches(test["features"])                    # (N, h, w, C)
    n, h, w, c = patches.shape
    scores = torch.empty(n, h, w)
    for cid, bank in banks.items():
        idx = torch.nonzero(test["category"] == cid).flatten()
        if len(idx):
            scores[idx] = torch.cdist(patches[idx].reshape(-1, c), bank).min(1).values.reshape(len(idx), h, w)
    image = scores.flatten(1).max(1).values.numpy()
    maps = F.interpolate(scores[:, None], size=(input_size, input_size), mode="bilinear", align_corners=True)[:, 0]
    maps = np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])
    return maps, image, build, time.perf_counter() - start


@torch.no_grad()
def uniad_maps(model, test: dict, input_size: int, batch_size: int = 32) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    maps = []
    for chunk in test["features"].split(batch_size):
        out = model(feature_align=chunk)
        maps.append(anomaly_map(out["feature_rec"], out["feature_align"], input_size)[:, 0])
    return torch.cat(maps).numpy(), time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train_anomaly.py run directory or export")
    p.add_argument("--data_dir", default=None, help="default: the run's --data_dir")
    p.add_argument("--coreset", type=float, default=0.1, help="PatchCore memory bank kept per category (fraction)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="folder for the .md/.json report")
    flags = p.parse_args()
    if not 0 < flags.coreset <= 1:
        fail(f"--coreset must be in (0, 1], got {flags.coreset}")
    try:
        device = resolve_device(flags.device)
        export = load_export(flags.checkpoint)
    except UsageError as e:
        fail(str(e))
    run_args = export.args
    data_dir = flags.data_dir or run_args["data_dir"]
    cats = [c.strip() for c in run_args["categories"].split(",")] if run_args.get("categories") else None
    try:
        splits = load_splits(data_dir, cats, run_args["val_fraction"], run_args.get("split_seed", 0), run_args.get("train_meta"),
                             run_args.get("test_meta"))
    except ValueError as e:
        fail(f"--data_dir {e}")
    model = export.model.to(device)
    input_size = model.input_size[0]
    info = print_header("UniAD vs PatchCore on the same frozen features")
    start = time.perf_counter()
    train = features(model, splits.train, splits.categories, input_size, device)
    test = features(model, splits.test, splits.categories, input_size, device)
    backbone_s = time.perf_counter() - start
    n_images = len(splits.train) + len(splits.test)
    print(f"features of {n_images} images in {backbone_s:.1f} s", flush=True)

    model = model.cpu()
    u_maps, u_seconds = uniad_maps(model, test, input_size)
    p_maps, p_image, p_build, p_seconds = patchcore_maps(train, test, splits.categories, flags.coreset, input_size)
    pool = int(run_args.get("score_pool", 16))
    labels = dict(masks=test["mask"].numpy(), labels=test["label"].numpy(), categories=test["category"].numpy(),
                  category_names=splits.categories, has_mask=test["has_mask"].numpy())
    results = {"UniAD": anomaly_metrics(u_maps, pool=pool, **labels),
               "PatchCore": anomaly_metrics(p_maps, pool=pool, **labels)}
    # PatchCore's image score is its largest position score, not the pooled map's maximum
    for cid, name in enumerate(splits.categories):
        idx = labels["categories"] == cid
        results["PatchCore"][f"image_auroc/{name}"] = auroc(p_image[idx], labels["labels"][idx])
    results["PatchCore"]["image_auroc"] = float(np.nanmean([results["PatchCore"][f"image_auroc/{c}"]
                                                            for c in splits.categories]))

    rows = []
    for name in [*splits.categories, "mean"]:
        key = "" if name == "mean" else f"/{name}"
        row = {"category": name}
        for method, m in results.items():
            for metric in ("image_auroc", "pixel_auroc", "aupro"):
                row[f"{method} {metric}"] = 100 * m[metric + key]
        rows.append(row)
    columns = ["category", *(f"{m} {k}" for k in ("image_auroc", "pixel_auroc", "aupro") for m in results)]
    n_test = len(splits.test)
    speed = [{"method": "UniAD (transformer on cached features)", "images_per_s": n_test / u_seconds},
             {"method": f"PatchCore (nearest neighbour, coreset {flags.coreset:g})", "images_per_s": n_test / p_seconds},
             {"method": "frozen backbone + neck (shared, both need it)", "images_per_s": n_images / backbone_s}]
    notes = [f"Run {export.folder} (update {export.metrics.get('global_step', '?')}), backbone "
             f"{run_args['backbone']} ({run_args.get('backbone_weights') or 'random init'}), input {input_size} px; "
             f"{len(splits.train)} training and {n_test} test images of {len(splits.categories)} categories.",
             f"PatchCore memory banks built in {p_build:.1f} s. PatchCore keeps one bank per category and is told each "
             "test image's category; UniAD is one model for all categories and is not.",
             "Scores in %; image AUROC from each method's own image score (UniAD: max of the map avg-pooled over "
             f"{pool} px; PatchCore: largest position score)."]
    report("anomaly_quality", "UniAD vs PatchCore (same frozen features)", info,
           [table(rows, columns, fmt=".1f"), table(speed, ["method", "images_per_s"], title="Inference speed")],
           notes, flags.out)


if __name__ == "__main__":
    main()
