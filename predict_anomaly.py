"""Anomaly maps, image scores and decisions of a trained UniAD run, in files other tools read.

    python predict_anomaly.py --checkpoint runs/anomaly/<run> --data datasets/anomaly --out preds      # MVTec layout
    python predict_anomaly.py --checkpoint runs/anomaly/<run> --data photos/ --category bottle --out preds --overlays

``--data`` is an MVTec-layout folder (every ``<category>/test/<defect>/*`` of the categories the model knows is
predicted, with the masks of ``ground_truth/`` when present, and the metrics are printed), or a folder of
images, or one image (``--category`` names their category; it may be left out when the model knows one).

Writes into ``--out`` (a new or empty folder; ``--overwrite`` replaces it, and only once everything succeeded):
    scores.csv                          category, path, defect, score, threshold, is_anomalous
    <category>/<defect>/<stem>.npy      the anomaly map, float32 (input_size x input_size), as the MVTec AD
                                        evaluation scripts read them (defect = the image's folder for plain images)
    <category>/<defect>/<stem>_overlay.png, <stem>_mask.png     with --overlays / --masks
The decision uses the export's ``thresholds.json`` (per category, set at the end of training on the normal
validation images); ``--threshold`` and ``--pixel_threshold`` override it for every category. Bad input ends
with one line naming the file or flag, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.anomaly import AnomalyDataset, Record, list_test
from data.anomaly.io import heatmap_overlay, map_path, to_rgb, write_png, write_scores
from data.anomaly.layout import IMAGE_EXTENSIONS, find_categories, validate
from metrics.anomaly import anomaly_map, anomaly_metrics, image_scores
from training.config import UsageError, fail
from training.export import load_export_or_exit, resolve_device
from training.io import check_output, write_folder_atomically


def read_thresholds(folder: Path) -> dict:
    path = folder / "thresholds.json"
    if not path.is_file():
        fail(f"--checkpoint {folder}: no thresholds.json (the export of an unfinished run?); finish or resume the "
             "run, or give --threshold and --pixel_threshold")
    try:
        spec = json.loads(path.read_text())
        spec["categories"], spec["score"], spec["score_pool"]
    except (ValueError, KeyError, TypeError) as e:
        fail(f"--checkpoint {path}: not a thresholds.json written by train_anomaly.py ({type(e).__name__}: {e})")
    return spec


def find_records(data: Path, categories: list[str], category: str | None) -> tuple[list[Record], bool]:
    """(records, labelled): the test images of an MVTec-layout folder (labelled by their folders), or the images
    of a folder or one image file under --category (unlabelled: label 0, defect = the image's folder)."""
    if data.is_dir() and any((data / c / "test").is_dir() for c in categories):
        if category is not None:
            if not (data / category / "test").is_dir():
                fail(f"--data {data}: no {category}/test folder (--category {category})")
            categories = [category]
        try:
            records = list_test(data, [c for c in categories if (data / c / "test").is_dir()])
        except ValueError as e:
            fail(f"--data {e}")
        return records, True
    if category is None:
        if len(categories) > 1:
            fail(f"--category is needed for plain images: the model knows {', '.join(categories)}")
        category = categories[0]
    files = [data] if data.is_file() else sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) \
        if data.is_dir() else []
    if not files:
        fail(f"--data {data}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no <category>/test/ folder of a category "
             f"the model knows ({', '.join(categories)})")
    return [Record(str(p), category, 0, p.parent.name) for p in files], False


@torch.no_grad()
def predict_maps(model, loader, device, input_size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """(maps (N, H, W) float32, the items' masks, has_mask, labels and categories as arrays)."""
    maps, extra = [], {k: [] for k in ("mask", "has_mask", "label", "category")}
    for batch in loader:
        out = model(images=batch["image"].to(device))
        maps.append(anomaly_map(out["feature_rec"].float(), out["feature_align"].float(), input_size)[:, 0].cpu())
        for k in extra:
            extra[k].append(batch[k])
    extra = {k: torch.cat(v).numpy() for k, v in extra.items()}
    extra["mask"] = extra["mask"][:, 0]
    return torch.cat(maps).numpy(), extra


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="train_anomaly.py run directory or export (best/, final/)")
    parser.add_argument("--data", required=True, help="MVTec-layout folder, folder of images, or one image")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--category", default=None, help="category of plain images (or: predict only this one)")
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold for every category")
    parser.add_argument("--pixel_threshold", type=float, default=None, help="map threshold of --masks for every category")
    parser.add_argument("--overlays", action="store_true", help="write <stem>_overlay.png (the map over the image)")
    parser.add_argument("--masks", action="store_true", help="write <stem>_mask.png (255 where map >= pixel threshold)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        out = check_output(args.out, args.overwrite, folder=True)
        device = resolve_device(args.device)
    except UsageError as e:
        fail(str(e))
    export = load_export_or_exit(args.checkpoint, device)
    overridden = args.threshold is not None and (args.pixel_threshold is not None or not (args.masks or args.overlays))
    if (export.folder / "thresholds.json").is_file() or not overridden:
        spec = read_thresholds(export.folder)
        categories = list(spec["categories"])
    else:  # thresholds given on the command line; the categories come from the data
        spec = {"score": export.args.get("score", "max"), "score_pool": export.args.get("score_pool", 16)}
        data = Path(args.data)
        categories = [args.category] if args.category else find_categories(data) if data.is_dir() else []
        if not categories:
            fail("--category is needed: the export has no thresholds.json naming its categories")
    if args.category is not None and args.category not in categories:
        fail(f"--category {args.category}: the model knows {', '.join(categories)}")
    records, labelled = find_records(Path(args.data), categories, args.category)
    try:
        validate(records)
    except ValueError as e:
        fail(f"--data {e}")
    input_size = export.model.input_size
    dataset = AnomalyDataset(records, categories, export.model.input_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)

    start = time.perf_counter()
    try:
        maps, items = predict_maps(export.model, loader, device, input_size)
    except ValueError as e:  # an image that lists fine but does not decode
        fail(f"--data {e}")
    seconds = time.perf_counter() - start
    scores = image_scores(maps, spec["score"], spec["score_pool"])

    def threshold(name: str, kind: str) -> float:
        given = args.threshold if kind == "image" else args.pixel_threshold
        return given if given is not None else spec["categories"][name][kind]

    def write(folder: Path) -> None:
        rows = []
        for i, r in enumerate(records):
            t = threshold(r.category, "image")
            rows.append(dict(category=r.category, path=r.path, defect=r.defect, score=float(scores[i]), threshold=t,
                             is_anomalous=scores[i] >= t))
            target = map_path(folder, r.category, r.defect, r.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, maps[i].astype(np.float32))
            if args.overlays or args.masks:
                pixel = threshold(r.category, "pixel")
            if args.overlays:
                rgb = to_rgb(dataset[i]["image"])
                write_png(map_path(folder, r.category, r.defect, r.path, "_overlay.png"),
                          heatmap_overlay(rgb, maps[i], pixel / 2, 2 * pixel))
            if args.masks:
                write_png(map_path(folder, r.category, r.defect, r.path, "_mask.png"),
                          ((maps[i] >= pixel) * 255).astype(np.uint8))
        write_scores(folder / "scores.csv", rows)
    write_folder_atomically(out, write)
    flagged = sum(scores[i] >= threshold(r.category, "image") for i, r in enumerate(records))
    print(f"{len(records)} images -> {out} ({flagged} flagged anomalous; {len(records) / seconds:.1f} images/s "
          f"on {device}, batch {args.batch_size})")
    if labelled and len(set(items["label"].tolist())) > 1:
        try:
            metrics = anomaly_metrics(maps, items["mask"], items["label"], items["category"], categories,
                                      items["has_mask"], pool=spec["score_pool"])
        except ValueError as e:  # e.g. a normal test image whose mask marks pixels: report, keep the files
            print(f"no metrics: {e}")
            return
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))
        for name in categories:
            if f"image_auroc/{name}" in metrics:
                print(f"  {name:16s} " + "  ".join(f"{k} {metrics[f'{k}/{name}']:.4f}"
                                                  for k in ("image_auroc", "pixel_auroc", "aupro")))


if __name__ == "__main__":
    main()
