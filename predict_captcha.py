"""Locate gap and slider in CAPTCHA images of any size with a trained run.

    python predict_captcha.py --checkpoint runs/captcha/<run> --images my_captchas/ --out preds.csv

``--checkpoint`` is a run directory (uses ``best/``, else ``final/``), one of those export
folders, or a ``.safetensors`` file next to an ``args.yaml``. EMA weights are used when the
export has them. Output columns: filename, gap_x, gap_y, slider_x, slider_y (original image
pixels), gap_score, slider_score (heatmap peaks in [0, 1]).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from data.captcha import letterbox, load_image, to_input_tensor
from losses.captcha import valid_cells
from metrics.captcha import decode
from models.lite_hrnet import LiteHRNet18FPN
from training.config import fail

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def resolve_weights(checkpoint: Path) -> tuple[Path, dict]:
    """-> (safetensors file, training args) or a one-line error."""
    if checkpoint.is_file():
        if checkpoint.suffix != ".safetensors":
            fail(f"--checkpoint {checkpoint}: expected a run directory, best/ or final/ folder, or a .safetensors file")
        folder, weights = checkpoint.parent, checkpoint
    elif checkpoint.is_dir():
        folder = next((checkpoint / d for d in ("best", "final") if (checkpoint / d / "model.safetensors").exists()), checkpoint)
        weights = folder / "model_ema.safetensors"
        if not weights.exists():
            weights = folder / "model.safetensors"
        if not weights.exists():
            fail(f"--checkpoint {checkpoint}: no best/ or final/ export with model.safetensors inside")
    else:
        fail(f"--checkpoint {checkpoint}: no such file or directory")
    args_file = next((p for p in (folder / "args.yaml", folder.parent / "args.yaml") if p.exists()), None)
    if args_file is None:
        fail(f"--checkpoint {checkpoint}: args.yaml not found next to the weights (needed to rebuild the model)")
    return weights, yaml.safe_load(args_file.read_text()) or {}


def load_model(checkpoint: str, device: torch.device):
    """-> (model in eval mode on device, weights file, training args); one-line errors on bad input."""
    weights, train_args = resolve_weights(Path(checkpoint))
    model = LiteHRNet18FPN(in_chans=4, fpn_channels=train_args.get("fpn_channels", 64),
                           head_channels=train_args.get("head_channels", 64),
                           with_angle=train_args.get("with_angle", True))
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as e:
        fail(f"--checkpoint {weights}: weights do not match the model in args.yaml ({str(e).splitlines()[0]})")
    return model.to(device).eval(), weights, train_args


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
    parser.add_argument("--checkpoint", required=True, help="run directory, best/ or final/ folder, or .safetensors file")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default="preds.csv", help="output CSV")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.batch_size < 1:
        fail(f"--batch_size must be >= 1, got {args.batch_size}")

    device = torch.device(args.device)
    model, _, _ = load_model(args.checkpoint, device)
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
