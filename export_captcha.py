"""Export a trained CAPTCHA run to ONNX for onnxruntime, checked against PyTorch before it is written.

    python export_captcha.py --checkpoint runs/captcha/<run> --out captcha.onnx
    python predict_captcha.py --checkpoint captcha.onnx --backend onnx --images my_captchas/ --out preds.csv

The graph is the network with the export's weights (the EMA ones when it has them), float32, any batch size.
Input ``image``: (B, 4, 256, 512), the letterboxed canvas of ``data.captcha.letterbox`` (the image scaled by
min(512 / w, 256 / h), centred, padding 0) as R, G, B / 255 and the padding mask (1 = image pixel).
Outputs: ``gap`` and ``slider`` (B, 1, 64, 128) heatmap logits, ``offset`` (B, 4, 64, 128) sub-cell offsets
in cells (gap x, y, slider x, y; within +-0.5); a model trained with ``--input_scale s`` shrinks the canvas
inside the graph and its outputs are s times smaller (stride 4s). Decoding is ``metrics.captcha.decode``,
which ``predict_captcha.py --backend onnx`` runs on these outputs: cells whose stride x stride pixels are
mostly padding are masked, each heatmap's peak is the centre of its flat top, the offset there is added,
times the stride gives canvas px, and (canvas px - pad) / scale gives image px. The file's metadata_props
record this (``stride`` among them).

Check: onnxruntime runs the file on ``--check_samples`` samples of the run's validation set (the synthetic
generator with the run's ``--val_seed``) next to PyTorch; the largest differences of the raw outputs and of
the decoded points (px) are printed, and a point difference above ``--tolerance_px`` stops with exit status
1 and nothing written. The file is written to ``<out>.tmp`` and renamed; an existing ``--out`` is replaced
only with ``--overwrite``. Bad input ends with one line naming the file or flag, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from data.captcha import CANVAS_H, CANVAS_W, SyntheticCaptchaDataset
from metrics.captcha import decode_on
from models.onnx_io import OPSET, OnnxModel, export_onnx
from training.config import UsageError, fail
from training.export import load_export_or_exit
from training.io import check_output, write_atomically

OUTPUTS = ["gap", "slider", "offset"]
DEFAULT_VAL_SEED = 1_000_003  # train_captcha.py's default --val_seed


def compare(model, onnx_model: OnnxModel, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Largest |PyTorch - onnxruntime| over `images`: of each raw output and of the decoded points (px). A
    non-finite value on either side counts as an infinite difference (max() would silently drop a NaN)."""
    worst = {name: 0.0 for name in OUTPUTS} | {"points_px": 0.0}

    def largest(a: torch.Tensor, b: torch.Tensor) -> float:
        diff = (a.float() - b.float()).abs()
        return float(diff.max()) if bool(torch.isfinite(diff).all()) else math.inf

    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        with torch.no_grad():
            ref = model(x)
        got = onnx_model(x)
        for name in OUTPUTS:
            worst[name] = max(worst[name], largest(ref[name], got[name]))
        worst["points_px"] = max(worst["points_px"], largest(decode_on(ref, x)[0], decode_on(got, x)[0]))
    return worst


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its best/, else final/), an export folder, a checkpoint or a "
                             ".safetensors file")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--check_samples", type=int, default=64,
                        help="validation samples run through both PyTorch and onnxruntime before writing (>= 1)")
    parser.add_argument("--tolerance_px", type=float, default=0.01,
                        help="largest accepted difference of a decoded point between the two, canvas px")
    args = parser.parse_args(argv)
    if args.check_samples < 1:
        fail(f"--check_samples must be >= 1, got {args.check_samples}")
    if not args.tolerance_px >= 0:  # also refuses nan
        fail(f"--tolerance_px must be a number >= 0, got {args.tolerance_px}")
    try:
        out = check_output(args.out, args.overwrite)
    except UsageError as e:
        fail(str(e))
    if out.suffix.lower() != ".onnx":
        fail(f"--out {out}: expected a .onnx file name")
    export = load_export_or_exit(args.checkpoint, torch.device("cpu"))
    model = export.model.float().eval()
    val_seed = int(export.args.get("val_seed", DEFAULT_VAL_SEED))
    samples = SyntheticCaptchaDataset(args.check_samples, seed=val_seed, fresh_each_epoch=False)
    images = torch.stack([samples[i]["image"] for i in range(len(samples))])
    metadata = {
        "producer": "export_captcha.py", "weights": str(export.weights), "input": "image",
        "input_layout": f"float32 (B, 4, {CANVAS_H}, {CANVAS_W}): letterboxed RGB / 255 and padding mask",
        "outputs": json.dumps(OUTPUTS), "canvas_w": str(CANVAS_W), "canvas_h": str(CANVAS_H),
        "stride": str(model.stride),
        "decoding": "metrics.captcha.decode: flat-top centre of each masked heatmap + offset, x stride; "
                    "image px = (canvas px - pad) / scale",
    }
    print(f"weights: {export.weights}")
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "model.onnx"
        export_onnx(model, images[:1], trial, OUTPUTS, input_name="image", metadata=metadata)
        worst = compare(model, OnnxModel(trial), images)
        print(f"onnxruntime vs PyTorch on {len(images)} validation samples (val_seed {val_seed}): max |diff| "
              + ", ".join(f"{name} {value:.2e}" for name, value in worst.items() if name != "points_px")
              + f"; decoded points {worst['points_px']:.4f} px")
        if not worst["points_px"] <= args.tolerance_px:
            sys.stderr.write(f"{Path(sys.argv[0]).name}: error: decoded points differ by {worst['points_px']:.4f} "
                             f"px, more than --tolerance_px {args.tolerance_px}; nothing written\n")
            raise SystemExit(1)
        write_atomically(out, lambda path: path.write_bytes(trial.read_bytes()))
    print(f"-> {out} (opset {OPSET}, {out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
