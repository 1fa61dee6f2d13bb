"""Inference latency of LiteHRNet18FPN: the model alone and the whole predict path.

    python benchmarks/captcha_latency.py [--checkpoint runs/captcha/<run>] [--batch_sizes 1,32 --iters 20]

"model" rows time model(image) + decode (argmax and offsets), eval mode under torch.no_grad,
on real letterboxed validation samples: fp32 on the CPU, and on a GPU when one is present fp32
and bf16 autocast too. "end-to-end" rows time what predict_captcha.py does per batch: read the
PNGs, letterbox, build the 4-channel tensors, model, decode and map the points back to
source px, on predict_captcha.py's default device in fp32. Times are per batch and per image
(batch time / batch size), median and 90th percentile over --iters timed iterations.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import copy
import tempfile
import time

import torch

from benchmarks.common import int_list, positive, print_header, report, stats_ms, table
from data.captcha import SyntheticCaptchaDataset, export, letterbox, load_image, to_input_tensor
from losses.captcha import valid_cells
from metrics.captcha import decode
from models.lite_hrnet import LiteHRNet18FPN
from training.export import load_export_or_exit

COLUMNS = ["path", "device", "precision", "batch", "ms_per_batch_median", "ms_per_batch_p90",
           "ms_per_image_median", "ms_per_image_p90", "images_per_s"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="run directory, best/ or final/ folder, or .safetensors file; default: random weights")
    p.add_argument("--fpn_channels", type=int, default=64, help="random-weight model only (the GPU recipe's width)")
    p.add_argument("--head_channels", type=int, default=64, help="random-weight model only")
    p.add_argument("--batch_sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each row")
    p.add_argument("--channels_last", action="store_true", help="NHWC model and input for the model rows")
    p.add_argument("--no_e2e", action="store_true", help="skip the end-to-end predict rows")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--val_seed", type=int, default=1_000_003, help="seed of the synthetic samples used as inputs")
    p.add_argument("--out", default=None, help="folder for captcha_latency.md/.json")
    args = p.parse_args()
    args.batch_sizes = int_list(args.batch_sizes, "--batch_sizes", minimum=1)
    positive("--iters", args.iters)
    positive("--warmup", args.warmup, 0)
    if args.threads:
        torch.set_num_threads(positive("--threads", args.threads))
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_model(model, image: torch.Tensor, bf16: bool, iters: int, warmup: int) -> list[float]:
    device = image.device
    seconds = []
    for k in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(image)
        decode(outputs, valid_cells(image))
        sync(device)
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def time_predict(model, paths: list[Path], device: torch.device, iters: int, warmup: int) -> list[float]:
    """predict_captcha.py's per-batch work, file reading included."""
    seconds = []
    for k in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        tensors, geometry = [], []
        for path in paths:
            canvas, mask, scale, pad = letterbox(load_image(path))
            tensors.append(to_input_tensor(canvas, mask))
            geometry.append((scale, pad))
        image = torch.stack(tensors).to(device)
        points, scores = decode(model(image), valid_cells(image))
        points, scores = points.cpu(), scores.cpu()
        for (scale, (pad_x, pad_y)), pts in zip(geometry, points):
            ((pts - torch.tensor([pad_x, pad_y])) / scale).tolist()
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def row(path: str, device: torch.device, precision: str, batch: int, seconds: list[float]) -> dict:
    s = stats_ms(seconds)
    return {"path": path, "device": device.type, "precision": precision, "batch": batch,
            "ms_per_batch_median": s["median"], "ms_per_batch_p90": s["p90"],
            "ms_per_image_median": s["median"] / batch, "ms_per_image_p90": s["p90"] / batch,
            "images_per_s": 1000 * batch / s["median"]}


def main():
    args = parse_args()
    info = print_header("CAPTCHA inference latency")
    cpu = torch.device("cpu")
    if args.checkpoint:
        loaded = load_export_or_exit(args.checkpoint, cpu)
        model, source = loaded.model, f"weights {loaded.weights}"
    else:
        torch.manual_seed(0)
        model = LiteHRNet18FPN(in_chans=4, fpn_channels=args.fpn_channels, head_channels=args.head_channels).eval()
        source = f"random weights (fpn {args.fpn_channels}, heads {args.head_channels})"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{source}; {n_params / 1e6:.3f} M parameters", flush=True)

    largest = max(args.batch_sizes)
    ds = SyntheticCaptchaDataset(largest, seed=args.val_seed, fresh_each_epoch=False)
    images = torch.stack([ds[i]["image"] for i in range(largest)])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    modes = [(cpu, "fp32")]
    if torch.cuda.is_available():
        modes += [(torch.device("cuda"), "fp32"), (torch.device("cuda"), "bf16 autocast")]

    rows = []
    for device, precision in modes:
        net = copy.deepcopy(model).to(device, memory_format=memory_format).eval()
        for b in args.batch_sizes:
            image = images[:b].to(device).contiguous(memory_format=memory_format)
            seconds = time_model(net, image, precision.startswith("bf16"), args.iters, args.warmup)
            rows.append(row("model", device, precision, b, seconds))
            print(f"  model {device.type} {precision} batch {b}: {rows[-1]['ms_per_batch_median']:.1f} ms", flush=True)

    e2e_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.no_e2e:
        net = copy.deepcopy(model).to(e2e_device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            export(Path(tmp) / "images", largest, seed=args.val_seed)
            paths = sorted((Path(tmp) / "images").glob("*.png"))
            for b in args.batch_sizes:
                seconds = time_predict(net, paths[:b], e2e_device, args.iters, args.warmup)
                rows.append(row("end-to-end", e2e_device, "fp32", b, seconds))
                print(f"  end-to-end {e2e_device.type} batch {b}: {rows[-1]['ms_per_batch_median']:.1f} ms", flush=True)

    notes = [
        f"LiteHRNet18FPN, {source}, {n_params / 1e6:.3f} M parameters; input 4x256x512 (RGB + padding mask); "
        f"channels_last {args.channels_last} (model rows only).",
        "model = model(image) + decode, eval + torch.no_grad; end-to-end = PNG read + letterbox + tensors + model "
        "+ decode + back to source px, as predict_captcha.py (fp32, its default device, files in the page cache).",
        f"{args.iters} timed iterations after {args.warmup} warm-up iterations per row; ms_per_image = batch time / "
        "batch; p90 = 90th percentile.",
    ]
    report("captcha_latency", "CAPTCHA inference latency", info,
           [table(rows, COLUMNS, formats={"images_per_s": ".1f"})], notes, args.out,
           extra={"source": source, "parameters": n_params})


if __name__ == "__main__":
    main()
