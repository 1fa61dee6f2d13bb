"""Does the simulator keep up with the model? Windows simulated per second against windows trained on per second.

    python benchmarks/smlm_throughput.py [--config configs/smlm_cpu.yaml] [--workers 0,1,2] [--out bench_out]

train_smlm.py simulates every training window on the fly (``SMLMSimDataset`` in DataLoader workers), so the
simulator must produce windows at least as fast as a training step consumes them, or the accelerator idles.
Measured, with the preset's frame size, density, camera, PSF and model:

- "simulator, block b, DataLoader k workers": ``SMLMSimDataset`` windows per second through a DataLoader with
  ``collate_smlm`` and the preset's batch size (the first batch, which pays the worker start-up, is excluded);
  block b windows are cut from one simulated movie (train_smlm.py uses 16; 1 = one movie per window).
- "simulator, one movie on <device>": ``simulate_movie`` of a long movie in one vectorised call, frames per
  second (one frame = one window's worth of new data): the rate of simulating on the accelerator itself.
- "training step": windows per second of train_smlm.py's ``train_step`` (forward + GMM loss + backward +
  clipping + AdamW through Accelerate) and the loop's per-update work, on pre-made batches.
- "inference": frames per second of the forward pass alone (what fit_smlm.py's network part costs).

The ratio column is rate / training-step rate: >= 1 means that source keeps the training step fed. On a CPU
the DataLoader workers and the training step share the same cores, so the two rates do not add up there.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from benchmarks.common import int_list, loop_update, positive, print_header, report, table
from data.smlm import SMLMSimDataset, collate_smlm, simulate_movie
from models.sigma_munet import SigmaMUNet
from train_smlm import model_kwargs, parse_smlm_args, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(cfg, args, workers: int, batches: int, block: int) -> float:
    """Windows per second of SMLMSimDataset through a DataLoader, after its first batch."""
    ds = SMLMSimDataset(cfg, (batches + 1) * args.batch_size, seed=0, window=args.window, block=block)
    dl = DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collate_smlm, drop_last=True)
    it = iter(dl)
    next(it)
    start = time.perf_counter()
    n = sum(batch["frames"].shape[0] for batch in it)
    return n / (time.perf_counter() - start)


def movie_rate(cfg, frames: int, device: torch.device) -> float:
    """Frames per second of one vectorised simulate_movie call on the device (after a warm-up call)."""
    simulate_movie(cfg, min(frames, 64), torch.Generator(device=device).manual_seed(0))
    sync(device)
    start = time.perf_counter()
    simulate_movie(cfg, frames, torch.Generator(device=device).manual_seed(1))
    sync(device)
    return frames / (time.perf_counter() - start)


def model_rates(args, batches: list[dict], steps: int, device: torch.device) -> tuple[float, float]:
    """(training windows/s, inference frames/s) of the preset's model on pre-made batches; training runs
    train_smlm.py's own ``train_step`` and per-update loop work (``benchmarks.common.loop_update``)."""
    accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=1)
    model = SigmaMUNet(**model_kwargs(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    update = loop_update(train_step, model, optimizer, accelerator, args, lambda batch: batch["frames"].shape[0])

    def rate(step) -> float:
        step(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for k in range(steps):
            step(batches[k % len(batches)])
        sync(device)
        return steps * args.batch_size / (time.perf_counter() - start)

    model.train()
    train = rate(update)
    model.eval()
    with torch.no_grad():
        infer = rate(lambda b: model(b["frames"]))
    return train, infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smlm_cpu.yaml", help="train_smlm.py preset")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    parser.add_argument("--blocks", default="1,16", help="SMLMSimDataset block sizes (windows per simulated movie)")
    parser.add_argument("--batches", type=int, default=8, help="batches timed per DataLoader setting")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps / inference batches")
    parser.add_argument("--movie_frames", type=int, default=2048, help="frames of the one-call simulate_movie")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=None, help="also write smlm_throughput.md/.json here")
    flags = parser.parse_args()
    for flag in ("batches", "steps", "movie_frames"):
        positive(f"--{flag}", getattr(flags, flag))
    workers = int_list(flags.workers, "--workers")
    blocks = int_list(flags.blocks, "--blocks", minimum=1)
    config = flags.config if Path(flags.config).exists() or not (ROOT / flags.config).exists() else str(ROOT / flags.config)
    argv = ["--config", config, "--report_to", "none"]
    if flags.batch_size is not None:
        argv += ["--batch_size", str(positive("--batch_size", flags.batch_size))]
    args, cfg = parse_smlm_args(argv)
    device = torch.device("cuda" if flags.device == "cuda" or (flags.device == "auto" and torch.cuda.is_available())
                          else "cpu")

    info = print_header("SMLM simulator throughput vs model consumption")
    print(f"preset {flags.config}: {cfg.img_size[0]}x{cfg.img_size[1]} px, {cfg.em_avg:.1f} emitters/frame, "
          f"{cfg.psf} PSF, {cfg.camera} camera; model {args.initial_features} features, depth "
          f"{args.depth_shared}/{args.depth_union}; batch {args.batch_size}; device {device}", flush=True)

    ds = SMLMSimDataset(cfg, args.batch_size * 2, seed=0, window=args.window)
    batches = [collate_smlm([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]) for b in range(2)]
    train, infer = model_rates(args, batches, flags.steps, device)
    rows = [{"source": f"training step ({device.type})", "per_s": train, "unit": "windows"},
            {"source": f"inference ({device.type})", "per_s": infer, "unit": "frames"}]
    for block in blocks:
        for k in workers:
            rows.append({"source": f"simulator, block {block}, DataLoader {k} worker{'s' if k != 1 else ''}",
                         "per_s": loader_rate(cfg, args, k, flags.batches, block), "unit": "windows"})
            print(f"  {rows[-1]['source']}: {rows[-1]['per_s']:.0f} windows/s", flush=True)
    rows.append({"source": "simulator, one movie on cpu", "per_s": movie_rate(cfg, flags.movie_frames, torch.device("cpu")),
                 "unit": "frames"})
    if device.type == "cuda":
        rows.append({"source": "simulator, one movie on cuda", "per_s": movie_rate(cfg, flags.movie_frames, device),
                     "unit": "frames"})
    for row in rows:
        row["vs_training"] = row["per_s"] / train
    notes = ["per_s: windows (or frames) per second; vs_training: per_s / training-step windows per second "
             "(>= 1: keeps the training step fed).",
             "On a CPU, DataLoader workers and the training step compete for the same cores."]
    report("smlm_throughput", "SMLM simulator throughput vs model consumption", info,
           [table(rows, ["source", "unit", "per_s", "vs_training"], fmt=".1f", formats={"vs_training": ".2f"})],
           notes, flags.out)


if __name__ == "__main__":
    main()
