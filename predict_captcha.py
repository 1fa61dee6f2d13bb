"""Locate gap and slider in CAPTCHA images of any size with a trained run.

    python predict_captcha.py --checkpoint runs/captcha/<run> --images my_captchas/ --out preds.csv

``--checkpoint`` is a run directory (uses ``best/``, else ``final/``), one of those export
folders, a ``checkpoints/step_*`` folder, or a ``.safetensors`` file of an export; the model is
rebuilt from the export's ``model.json`` (``training.export.load_export``). EMA weights are used
when the export has them. Output columns: filename, gap_x, gap_y, slider_x, slider_y (original image
pixels), gap_score, slider_score (heatmap peaks in [0, 1]).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from data.captcha import letterbox, load_image, to_input_tensor
from losses.captcha import valid_cells
from metrics.captcha import decode
from training.config import UsageError, fail
from training.export import load_export_or_exit, resolve_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def list_images(items: list[str]) -> list[Path]:
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            fail(f"--images {item}: no such file or directory")
    if not paths:
        fail(f"--images {' '.join(items)}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best/, else final/), an export folder, a checkpoint or a .safetensors file")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default="preds.csv", help="output CSV")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device)
    except UsageError as e:
        fail(str(e))
    export = load_export_or_exit(args.checkpoint, device)
    model = export.model
    print(f"weights: {export.weights}")
    paths = list_images(args.images)

    rows, model_s, total_start = [], 0.0, time.perf_counter()
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        tensors, geometry = [], []
        for path in chunk:
            try:
                canvas, mask, scale, pad = letterbox(load_image(path))
            except ValueError as e:
                fail(str(e))
            tensors.append(to_input_tensor(canvas, mask))
            geometry.append((scale, pad))
        image = torch.stack(tensors).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            points, scores = decode(model(image), valid_cells(image))
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_s += time.perf_counter() - t0
        for path, (scale, (pad_x, pad_y)), pts, sc in zip(chunk, geometry, points.cpu(), scores.cpu()):
            orig = (pts - torch.tensor([pad_x, pad_y])) / scale  # canvas px -> original image px
            (gx, gy), (sx, sy) = orig.tolist()
            rows.append([path.name, f"{gx:.2f}", f"{gy:.2f}", f"{sx:.2f}", f"{sy:.2f}", f"{sc[0]:.4f}", f"{sc[1]:.4f}"])
    total_s = time.perf_counter() - total_start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "gap_x", "gap_y", "slider_x", "slider_y", "gap_score", "slider_score"])
        writer.writerows(rows)
    n = len(paths)
    print(f"{n} images -> {out}")
    print(f"latency per image: model {1000 * model_s / n:.2f} ms, total incl. loading {1000 * total_s / n:.2f} ms "
          f"(batch {args.batch_size}, {device})")


if __name__ == "__main__":
    main()
