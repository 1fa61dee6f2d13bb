"""Inference latency of LiteHRNet18FPN (PyTorch and ONNX) against ddddocr's slide_match, and their accuracy
on the same validation images.

    python benchmarks/captcha_latency.py [--checkpoint runs/captcha/<run>] [--batch_sizes 1,32 --iters 20]

"model" rows time model(image) + decode (peak, centre of a flat top, offsets), eval mode under torch.no_grad,
on real letterboxed validation samples: fp32 on the CPU, and on a GPU when one is present fp32
and bf16 autocast too. "onnx" rows time the same network exported by export_captcha.py's route
(models.onnx_io) and run by onnxruntime on the CPU, in fp32 and after onnxruntime's dynamic int8
quantisation, + the same decode. "ddddocr" rows time
ddddocr's slide_match (edge template matching) on one image at a time, given the slider piece as an RGBA
image and the background right of the piece (a synthetic sample holds its piece; a real CAPTCHA delivers
them apart). "two-stage step" times models.captcha_match.two_stage on one image's outputs (the piece
search and the fused edge match predict_captcha.py adds after the model). "end-to-end" rows time what
predict_captcha.py does per batch: read the PNGs, letterbox, build the 4-channel tensors, model, decode,
the two-stage step and map the points back to source px, on predict_captcha.py's default device in fp32.
Times are per batch and per image (batch time / batch size), median and 90th percentile over --iters timed
iterations.

The accuracy table scores the gap on --accuracy_samples validation samples (canvas px, as
benchmarks/captcha_quality.py): ours with each backend, ddddocr given the true piece (an oracle: it
never has to find the slider), ddddocr given the piece cut out at our predicted slider (the blind use:
models.captcha_match.cut_piece, the piece's rim ring or a square where none closes), and our two-stage
solver (ONNX outputs), which matches that same piece and adds our gap probability.
Random weights (no --checkpoint) make
the accuracy of ours meaningless; the latency is the same.
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

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from PIL import Image

from benchmarks.common import int_list, positive, print_header, report, stats_ms, table
from data.captcha import SyntheticCaptchaDataset, export, generate_captcha, letterbox, load_image, to_input_tensor
from metrics.captcha import decode_on, point_errors, predict_points
from models.captcha_match import SEARCH_MARGIN, centroid, cut_piece, two_stage
from models.lite_hrnet import LiteHRNet18FPN
from models.onnx_io import OnnxModel, export_onnx
from training.export import load_export_or_exit

COLUMNS = ["path", "device", "precision", "batch", "ms_per_batch_median", "ms_per_batch_p90",
           "ms_per_image_median", "ms_per_image_p90", "images_per_s"]
ACCURACY_COLUMNS = ["method", "n", "gap_hit_le_2px", "gap_hit_le_5px", "gap_mae_px"]


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
    p.add_argument("--accuracy_samples", type=int, default=200,
                   help="validation samples of the accuracy table (0: no table)")
    p.add_argument("--out", default=None, help="folder for captcha_latency.md/.json")
    args = p.parse_args()
    args.batch_sizes = int_list(args.batch_sizes, "--batch_sizes", minimum=1)
    positive("--iters", args.iters)
    positive("--warmup", args.warmup, 0)
    positive("--accuracy_samples", args.accuracy_samples, 0)
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
        decode_on(outputs, image)
        sync(device)
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def time_predict(model, paths: list[Path], device: torch.device, iters: int, warmup: int) -> list[float]:
    """predict_captcha.py's per-batch work, file reading and the two-stage step (its default) included."""
    seconds = []
    for k in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        tensors, geometry, sources = [], [], []
        for path in paths:
            sources.append(load_image(path))
            canvas, mask, scale, pad = letterbox(sources[-1])
            tensors.append(to_input_tensor(canvas, mask))
            geometry.append((scale, pad))
        image = torch.stack(tensors).to(device)
        outputs = model(image)
        points, scores = decode_on(outputs, image)
        points, _ = two_stage(outputs, image, points.cpu(), sources, geometry)
        for (scale, (pad_x, pad_y)), pts in zip(geometry, points):
            ((pts - torch.tensor([pad_x, pad_y])) / scale).tolist()
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


class SlideInputs:
    """What ddddocr's slide_match gets for one synthetic sample: the piece (RGBA: the image under the piece's
    alpha, transparent elsewhere, as a transparent PNG piece is drawn) and the background right of the piece
    plus SEARCH_MARGIN px, where a gap can be; and how its answer maps back to the gap centre."""

    def __init__(self, sample: dict, slider_xy: tuple[float, float] | None = None):
        image = sample["image"]
        w = image.shape[1]
        x0, y0, x1, y1 = sample["slider_box"]
        if slider_xy is None:  # oracle: the true piece and its alpha
            alpha = sample["piece_alpha"]
        else:  # blind: the piece our two-stage solver cuts out at our slider (its rim ring, else a square)
            (x0, y0, x1, y1), alpha, _ = cut_piece(image, slider_xy)
        rgba = np.dstack([image[y0:y1, x0:x1] * (alpha[..., None] > 0), alpha]).astype(np.uint8)
        self.piece = Image.fromarray(rgba, "RGBA")
        self.cut = min(x1 + SEARCH_MARGIN, w - (x1 - x0))  # the background must stay wider than the piece
        self.background = Image.fromarray(np.ascontiguousarray(image[:, self.cut:]), "RGB")
        self.size, self.centroid = (x1 - x0, y1 - y0), centroid(alpha)

    def gap(self, result: dict) -> tuple[float, float]:
        """Gap centre (source px) from slide_match's answer: it returns the matched box's top-left + size // 2."""
        left = result["target_x"] - self.size[0] // 2
        top = result["target_y"] - self.size[1] // 2
        return self.cut + left + self.centroid[0], top + self.centroid[1]


def time_ddddocr(slide, inputs: list[SlideInputs], iters: int, warmup: int) -> list[float]:
    seconds = []
    for k in range(warmup + iters):
        item = inputs[k % len(inputs)]
        start = time.perf_counter()
        slide.slide_match(item.piece, item.background)
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def all_points(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, 2, 2) decoded (gap, slider) canvas px."""
    return torch.cat([predict_points(model, images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)])


@torch.no_grad()
def two_stage_points(model, images: torch.Tensor, sources: list, geometry: list, batch_size: int = 32):
    """(N, 2, 2) canvas px of the model's decode and of the two-stage solver (predict_captcha.py's default)
    on the same outputs."""
    plain, fused = [], []
    for i in range(0, len(images), batch_size):
        image = images[i:i + batch_size]
        outputs = model(image)
        plain.append(decode_on(outputs, image)[0])
        fused.append(two_stage(outputs, image, plain[-1], sources[i:i + batch_size], geometry[i:i + batch_size])[0])
    return torch.cat(plain), torch.cat(fused)


@torch.no_grad()
def time_two_stage(model, images: torch.Tensor, sources: list, geometry: list, iters: int, warmup: int):
    """Seconds per call of the two-stage step alone (piece search + fused match), one image per call, on the
    model's outputs for each image (computed once, outside the timing)."""
    prepared = []
    for k in range(len(sources)):
        image = images[k:k + 1]
        outputs = model(image)
        prepared.append((outputs, image, decode_on(outputs, image)[0], sources[k:k + 1], geometry[k:k + 1]))
    seconds = []
    for k in range(warmup + iters):
        start = time.perf_counter()
        two_stage(*prepared[k % len(prepared)])
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def accuracy_rows(model, onnx_model, int8_model, slide, n: int, seed: int) -> tuple[list[dict], float]:
    """Gap accuracy of ours (PyTorch, ONNX, ONNX int8) and ddddocr (oracle and blind piece) on validation
    samples 0..n-1; and the largest |ONNX - PyTorch| difference of a decoded point (px)."""
    samples = [generate_captcha((seed, 0, i)) for i in range(n)]
    boxes = [letterbox(s["image"]) for s in samples]
    images = torch.stack([to_input_tensor(canvas, mask) for canvas, mask, _, _ in boxes])
    to_canvas = lambda p, box: (p[0] * box[2] + box[3][0], p[1] * box[2] + box[3][1])  # noqa: E731
    to_source = lambda p, box: ((p[0] - box[3][0]) / box[2], (p[1] - box[3][1]) / box[2])  # noqa: E731
    true = np.array([[to_canvas(s["gap"], b), to_canvas(s["slider"], b)] for s, b in zip(samples, boxes)])
    ours = all_points(model, images)
    ours_onnx, two_stage_onnx = two_stage_points(onnx_model, images, [s["image"] for s in samples],
                                                 [(b[2], b[3]) for b in boxes])
    preds = {"ours (PyTorch)": ours.numpy(), "ours (ONNX)": ours_onnx.numpy(),
             "ours (ONNX, dynamic int8)": all_points(int8_model, images).numpy(),
             "ours, two-stage (ONNX)": two_stage_onnx.numpy()}
    for name, slider in (("ddddocr, true piece (oracle)", None), ("ddddocr, piece at our slider", ours[:, 1])):
        gaps = []
        for i, (s, b) in enumerate(zip(samples, boxes)):
            item = SlideInputs(s, None if slider is None else to_source(slider[i].tolist(), b))
            gaps.append(to_canvas(item.gap(slide.slide_match(item.piece, item.background)), b))
        pred = true.copy()
        pred[:, 0] = gaps
        preds[name] = pred
    rows = []
    for name, pred in preds.items():
        err = point_errors(pred, true)["gap"]
        rows.append({"method": name, "n": n, "gap_hit_le_2px": 100 * float((err <= 2).mean()),
                     "gap_hit_le_5px": 100 * float((err <= 5).mean()), "gap_mae_px": float(err.mean())})
    return rows, float((ours - ours_onnx).abs().max())


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

    import ddddocr  # a benchmark-only peer

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, images[:1], Path(tmp) / "model.onnx", ["gap", "slider", "offset"], input_name="image")
        onnx_model = OnnxModel(Path(tmp) / "model.onnx", threads=torch.get_num_threads())
        # onnxruntime's dynamic quantisation: int8 weights, activations quantised on the fly (ConvInteger)
        quantize_dynamic(str(Path(tmp) / "model.onnx"), str(Path(tmp) / "int8.onnx"), weight_type=QuantType.QUInt8)
        int8_model = OnnxModel(Path(tmp) / "int8.onnx", threads=torch.get_num_threads())
    for b in args.batch_sizes:
        for net, precision in ((onnx_model, "fp32 onnxruntime"), (int8_model, "dynamic int8 onnxruntime")):
            seconds = time_model(net, images[:b], False, args.iters, args.warmup)
            rows.append(row("onnx", cpu, precision, b, seconds))
            print(f"  onnx {precision} batch {b}: {rows[-1]['ms_per_batch_median']:.1f} ms", flush=True)
    slide = ddddocr.DdddOcr(det=False, ocr=False, show_ad=False)
    samples = [generate_captcha((args.val_seed, 0, i)) for i in range(largest)]
    inputs = [SlideInputs(s) for s in samples]
    rows.append(row("ddddocr slide_match", cpu, "-", 1, time_ddddocr(slide, inputs, args.iters, args.warmup)))
    print(f"  ddddocr slide_match batch 1: {rows[-1]['ms_per_batch_median']:.1f} ms", flush=True)
    sources = [s["image"] for s in samples]
    geometry = [letterbox(source)[2:] for source in sources]
    rows.append(row("two-stage step (after the model)", cpu, "-", 1,
                    time_two_stage(onnx_model, images, sources, geometry, args.iters, args.warmup)))
    print(f"  two-stage step batch 1: {rows[-1]['ms_per_batch_median']:.1f} ms", flush=True)

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

    tables = [table(rows, COLUMNS, formats={"images_per_s": ".1f"})]
    parity = None
    if args.accuracy_samples:
        acc, parity = accuracy_rows(model.cpu().eval(), onnx_model, int8_model, slide, args.accuracy_samples,
                                    args.val_seed)
        tables.append(table(acc, ACCURACY_COLUMNS, formats={"gap_mae_px": ".2f"}))
        print(f"  accuracy on {args.accuracy_samples} samples; max |ONNX - PyTorch| point {parity:.4f} px", flush=True)

    notes = [
        f"LiteHRNet18FPN, {source}, {n_params / 1e6:.3f} M parameters; input 4x256x512 (RGB + padding mask); "
        f"channels_last {args.channels_last} (model rows only).",
        "model = model(image) + decode, eval + torch.no_grad; end-to-end = PNG read + letterbox + tensors + model "
        "+ decode + two-stage step + back to source px, as predict_captcha.py (fp32, its default device, files in "
        "the page cache).",
        f"{args.iters} timed iterations after {args.warmup} warm-up iterations per row; ms_per_image = batch time / "
        "batch; p90 = 90th percentile.",
        "onnx = the same network and weights run by onnxruntime (CPU provider, torch's thread count) + the same "
        "decode; dynamic int8 = onnxruntime.quantization.quantize_dynamic of that file (QUInt8 weights); "
        "ddddocr = DdddOcr(det=False, ocr=False).slide_match(piece RGBA, background right of the piece), "
        "one image per call, PIL images already in memory (its own conversion included).",
        "two-stage step = models.captcha_match.two_stage on one image's ONNX outputs: the piece found by its rim "
        "near our slider, its edges matched along the image and fused with our gap probability (what "
        "predict_captcha.py adds after the model by default); add it to a model row for the whole solver.",
    ]
    if parity is not None:
        notes.append(f"Accuracy table: validation samples 0..{args.accuracy_samples - 1} (seed {args.val_seed}), gap "
                     "errors in canvas px (mean of |dx|, |dy|, as captcha_quality.py); the largest difference of a "
                     f"decoded point between ONNX and PyTorch over them: {parity:.4f} px.")
    report("captcha_latency", "CAPTCHA inference latency", info, tables, notes, args.out,
           extra={"source": source, "parameters": n_params, "onnx_max_point_diff_px": parity})


if __name__ == "__main__":
    main()
