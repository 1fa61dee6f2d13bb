"""UniAD training and inference speed: train_anomaly.py's step against a bare PyTorch loop, the feature cache
against recomputing the frozen backbone every step, and inference images/s at batch 1 and 32.

    python benchmarks/anomaly_step.py [--config configs/anomaly_cpu.yaml --batch_size 8] [--out bench_out]

1. Step overhead: "ours" is one update as train_anomaly.py's loop runs it on cached features: its own
   ``train_step`` (imported: the Accelerator-prepared model and optimizer, ``accelerator.accumulate``, the feature
   MSE, ``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer step/zero_grad), then the loop's
   per-update work (``benchmarks.common.loop_update``: loss sums, the finite check, the StepLR step). "bare" is
   the same model's forward on the same features, the MSE, backward, ``torch.nn.utils.clip_grad_norm_`` and
   AdamW. Same weights, same pre-made batches, alternating rounds. Target: ours/bare <= 1.05.
2. Feature cache: the same "ours" update fed cached ``feature_align`` against fed the images (the frozen backbone
   and neck run inside every step, as with --no-cache_features). The images are pre-loaded tensors, so image
   decoding, which the uncached loop also pays, is left out: the measured speed-up is a lower bound.
3. Inference: the full model (backbone, neck, transformer, anomaly map) in eval mode on image tensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import copy

import torch
from accelerate import Accelerator

from benchmarks.common import (add_step_flags, alternate_rounds, bare_update, check_step_flags, int_list, loop_update,
                               preset_args, print_header, report, stats_ms, step_methods, step_overhead_report, table,
                               timed)
from losses.anomaly import feature_mse
from metrics.anomaly import anomaly_map
from models.uniad import UniAD
from train_anomaly import Args, build_scheduler, model_kwargs, train_step


def train_args(flags) -> Args:
    return preset_args(flags, Args, ("batch_size", "input_size", "mixed_precision"))


def make_ours(args: Args, model, accelerator: Accelerator, check: str = "update"):
    optimizer = torch.optim.AdamW(model.reconstruction.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, 100, args)
    model.train()
    return loop_update(train_step, model, optimizer, accelerator, args, lambda batch: len(batch["index"]),
                       scheduler=scheduler, check=check)


def make_bare(args: Args, model, device):
    return bare_update(model, args, device, lambda m, batch: m(feature_align=batch["feature_align"]),
                       lambda out, batch: feature_mse(out["feature_rec"], out["feature_align"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/anomaly_cpu.yaml",
                   help="training preset for the model; 'none' = train_anomaly.py defaults")
    p.add_argument("--batch_size", type=int, default=None, help="images per update (default: the preset's)")
    p.add_argument("--input_size", type=int, default=None, help="image side in px (default: the preset's)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None, help="default: the preset's, else no")
    p.add_argument("--infer_batches", default="1,32", help="inference batch sizes")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_step_flags(p)
    flags = p.parse_args()
    check_step_flags(flags)
    infer_batches = int_list(flags.infer_batches, "--infer_batches", 1)
    args = train_args(flags)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    # random backbone weights: the timing does not depend on them, and the benchmark never needs the network
    base = UniAD(**model_kwargs(args, weights=False)).to(device)
    size = args.input_size
    images = [torch.randn(args.batch_size, 3, size, size, device=device) for _ in range(flags.distinct_batches)]
    index = torch.arange(args.batch_size, device=device)
    cached = [{"feature_align": base.features(x), "index": index} for x in images]
    uncached = [{"image": x, "index": index} for x in images]
    n_train = sum(p.numel() for p in base.reconstruction.parameters())
    note = (f"UniAD on {args.backbone} (random init), out_indices {args.out_indices}, "
            f"{size} px -> features {base.channels} x {base.feature_size}, transformer {args.hidden_dim} wide, "
            f"{args.num_encoder_layers} + {args.num_decoder_layers} layers ({n_train / 1e6:.2f} M trainable), batch "
            f"{args.batch_size}, mixed precision {accelerator.mixed_precision}, device {device}; preset "
            f"{args.config or 'train_anomaly.py defaults'}.")

    # 1. our update against the bare loop, both on cached features
    steps = step_methods(lambda model, check: make_ours(args, model, accelerator, check),
                         lambda model: make_bare(args, model, device), base, flags.previous_check)
    step_overhead_report("anomaly_step", "train_anomaly.py", steps, cached, flags, args.batch_size, device, note,
                         unit="images")

    # 2. the cache against recomputing the backbone in every step
    info = print_header("Feature cache: train_anomaly.py updates with cached features vs recomputed ones")
    ours_cached, ours_uncached = (make_ours(args, copy.deepcopy(base), accelerator) for _ in range(2))
    per_step = {"cached": lambda b: ours_cached(cached[b["k"]]), "recomputed": lambda b: ours_uncached(uncached[b["k"]])}
    seconds, _ = alternate_rounds(per_step, [{"k": k} for k in range(flags.distinct_batches)], flags.warmup,
                                  flags.rounds, flags.steps, device)
    summary = {name: stats_ms(s) for name, s in seconds.items()}
    rows = [{"training step": name, "ms_per_update": s["median"], "updates_per_s": 1000 / s["median"],
             "images_per_s": 1000 * args.batch_size / s["median"]} for name, s in summary.items()]
    speedup = summary["recomputed"]["median"] / summary["cached"]["median"]

    # 3. inference from images: backbone, neck, transformer and map
    model = copy.deepcopy(base).eval()
    infer_rows = []
    with torch.no_grad():
        for bs in infer_batches:
            x = torch.randn(bs, 3, size, size, device=device)

            def infer(_batch, x=x):
                with accelerator.autocast():
                    out = model(images=x)
                anomaly_map(out["feature_rec"].float(), out["feature_align"].float(), size)
            t = stats_ms(timed(infer, [{}], flags.warmup + flags.steps, device)[flags.warmup:])
            infer_rows.append({"batch": bs, "ms_per_batch": t["median"], "images_per_s": 1000 * bs / t["median"]})
    report("anomaly_cache", "Feature cache and inference speed", info,
           [table(rows, ["training step", "ms_per_update", "updates_per_s", "images_per_s"]),
            table(infer_rows, ["batch", "ms_per_batch", "images_per_s"], title="Inference (full model, from images)")],
           [note, f"cached / recomputed throughput: {speedup:.2f}x (target >= 5x); image decoding left out of both.",
            f"{flags.rounds} rounds x {flags.steps} updates per method after {flags.warmup} warm-up updates."],
           flags.out, extra={"speedup": speedup})


if __name__ == "__main__":
    main()
