"""Locate gap and slider in CAPTCHA images of any size with a trained run.

    python predict_captcha.py --checkpoint runs/captcha/<run> --images my_captchas/ --out preds.csv
    python predict_captcha.py --checkpoint captcha.onnx --backend onnx --images my_captchas/ --out preds.csv

``--checkpoint`` is a run directory (uses ``best/``, else ``final/``), one of those export
folders, a ``checkpoints/step_*`` folder, or a ``.safetensors`` file of an export; the model is
rebuilt from the export's ``model.json`` (``training.export.load_export``). EMA weights are used
when the export has them. ``--backend onnx`` runs an ``export_captcha.py`` file with onnxruntime instead;
letterboxing, decoding and the output are the same.

The gap comes from the two-stage solver (``models.captcha_match.two_stage``): the slider piece is found by
its light rim near the network's slider (or, where its rim ring does not close, a square around that
point), its edges are matched along the image, and the gap is where edge match + 0.5 x the network's gap
probability peaks; where a rim ring was found, the slider is that piece's centroid. It is far more robust
to gap renderings the network never saw (docs/captcha.md). ``--network_only`` uses the network's points
alone. Output columns: filename, gap_x, gap_y, slider_x, slider_y (original image pixels), gap_score,
slider_score (the network's heatmap peaks in [0, 1]), gap_piece (the piece matched for the gap: ring, box,
or none where the network's points are kept: with --network_only, for a non-finite slider point, or where
the slider leaves the piece no room to its right).

The CSV is written at the end to ``<out>.tmp`` and renamed; an existing ``--out`` is only replaced with
``--overwrite``, and an ``--out`` that is a directory or in a folder that cannot be written is refused before
any image is read. An image that cannot be decoded or is smaller than ``data.captcha.MIN_IMAGE_SIDE`` px
on a side stops the run with one line naming it (exit status 2, nothing written); with ``--skip_bad`` such
images are left out of the CSV and listed, with their count, at the end. Bad input ends with one line
naming the file or flag, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.captcha import CANVAS_H, CANVAS_W, letterbox, load_image, to_input_tensor
from metrics.captcha import decode_on
from models.captcha_match import two_stage
from models.onnx_io import OnnxModel, cuda_provider_available
from training.config import UsageError, fail
from training.export import load_export_or_exit, resolve_device
from training.io import check_output, write_atomically

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


def load_onnx_or_exit(path, device: torch.device) -> OnnxModel:
    """An export_captcha.py file for onnxruntime; anything else ends the program with one line."""
    if Path(path).suffix.lower() != ".onnx":
        fail(f"--checkpoint {path}: --backend onnx expects an .onnx file of export_captcha.py")
    try:
        model = OnnxModel(path, device)
    except ValueError as e:
        fail(f"--checkpoint {e}")
    shape = model.metadata.get("canvas_w"), model.metadata.get("canvas_h")
    if model.input_name != "image" or shape != (str(CANVAS_W), str(CANVAS_H)):
        fail(f"--checkpoint {path}: not an export_captcha.py file (expected input 'image' on a "
             f"{CANVAS_W}x{CANVAS_H} canvas)")
    return model


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best/, else final/), an export folder, a checkpoint or a .safetensors file")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default="preds.csv", help="output CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave out unreadable or too small images (listed at the end) instead of stopping")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="torch: a run or export; onnx: an .onnx file of export_captcha.py, run with onnxruntime")
    parser.add_argument("--network_only", action="store_true",
                        help="the network's gap and slider, without matching the slider piece along the image")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device)
    except UsageError as e:
        fail(str(e))
    if args.backend == "onnx":
        if args.device == "auto" and not cuda_provider_available():
            device = torch.device("cpu")  # auto: CUDA only where onnxruntime can use it
        model = load_onnx_or_exit(args.checkpoint, device)
        print(f"weights: {args.checkpoint} (onnxruntime)")
    else:
        export = load_export_or_exit(args.checkpoint, device)
        model = export.model
        print(f"weights: {export.weights}")
    try:
        out = check_output(args.out, args.overwrite)
    except UsageError as e:
        fail(str(e))
    paths = list_images(args.images)

    rows, skipped, model_s, match_s, total_start = [], [], 0.0, 0.0, time.perf_counter()
    # disable=None: a bar on a terminal only, not in logs
    progress = tqdm(total=len(paths), unit="image", desc="predicting", dynamic_ncols=True, disable=None)
    for start in range(0, len(paths), args.batch_size):
        names, tensors, geometry, sources = [], [], [], []
        for path in paths[start:start + args.batch_size]:
            try:
                source = load_image(path)
                canvas, mask, scale, pad = letterbox(source)
            except ValueError as e:
                if not args.skip_bad:
                    progress.close()
                    fail(f"{e} (--skip_bad leaves such images out)")
                skipped.append(str(e))
                continue
            names.append(path.name)
            tensors.append(to_input_tensor(canvas, mask))
            geometry.append((scale, pad))
            sources.append(source)
        progress.update(len(paths[start:start + args.batch_size]))
        if not tensors:
            continue
        image = torch.stack(tensors).to(device if args.backend == "torch" else "cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            outputs = model(image)
            points, scores = decode_on(outputs, image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        model_s += t1 - t0
        points, scores = points.cpu(), scores.cpu()
        pieces = ["none"] * len(names)
        if not args.network_only:
            points, pieces = two_stage(outputs, image, points, sources, geometry)
            match_s += time.perf_counter() - t1
        for name, (scale, (pad_x, pad_y)), pts, sc, piece in zip(names, geometry, points, scores, pieces):
            orig = (pts - torch.tensor([pad_x, pad_y])) / scale  # canvas px -> original image px
            (gx, gy), (sx, sy) = orig.tolist()
            rows.append([name, f"{gx:.2f}", f"{gy:.2f}", f"{sx:.2f}", f"{sy:.2f}", f"{sc[0]:.4f}", f"{sc[1]:.4f}",
                         piece])
    progress.close()
    total_s = time.perf_counter() - total_start
    if not rows:
        fail(f"--images {' '.join(args.images)}: none of the {len(paths)} images could be used; nothing written")

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "gap_x", "gap_y", "slider_x", "slider_y", "gap_score", "slider_score",
                             "gap_piece"])
            writer.writerows(rows)
    write_atomically(out, write)
    n = len(rows)
    print(f"{n} images -> {out}")
    print(f"latency per image: model {1000 * model_s / n:.2f} ms, piece matching {1000 * match_s / n:.2f} ms, "
          f"total incl. loading {1000 * total_s / n:.2f} ms (batch {args.batch_size}, {device}); "
          f"gap pieces: {sum(r[-1] == 'ring' for r in rows)} rim rings, {sum(r[-1] == 'box' for r in rows)} boxes, "
          f"{sum(r[-1] == 'none' for r in rows)} network's gap kept")
    if skipped:
        print(f"skipped {len(skipped)} image(s), left out of {out}:")
        for reason in skipped:
            print(f"  {reason}")


if __name__ == "__main__":
    main()
