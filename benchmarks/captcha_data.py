"""Synthetic CAPTCHA generator throughput against what the training step consumes.

    python benchmarks/captcha_data.py [--workers 0,1,2,4 --batch_size 8 --batches 30] [--out bench_out]

Measures, in one process:

- generator: samples/s through a real DataLoader over SyntheticCaptchaDataset (shuffle,
  drop_last, as train_captcha.py builds it) for each worker count, with and without the
  worker start-up that every training epoch pays (workers are not persistent);
- per category: single-process ms per sample (generate + letterbox + tensors, one
  SyntheticCaptchaDataset item) for each confusion category;
- consumption: samples/s of train_captcha.py's training step (benchmarks/captcha_step.py's
  "ours") on pre-generated batches at the same batch size, or --train_samples_per_s;
- end to end: that step fed by the DataLoader with each worker count, and the share of
  wall time spent waiting for data. On a machine with few cores the workers compete with
  the training step for the same cores, which the isolated numbers cannot show.
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
from accelerate import Accelerator
from torch.utils.data import DataLoader

import data.captcha.render as generator  # its photo cache is cleared to time cold workers
from benchmarks.captcha_step import add_model_flags, build_model, fixed_batches, make_ours_step, train_args
from benchmarks.common import int_list, positive, print_header, report, table, timed
from data.captcha import CATEGORIES, SyntheticCaptchaDataset
from train_captcha import Args
from training.config import UsageError, fail, load_yaml_config

QUICK_PRESET = "configs/captcha_quick.yaml"
WAIT_LIMIT = 0.10  # data-wait share of wall time above which the generator counts as the bottleneck


def loader(args: Args, workers: int, n_batches: int, epoch: int) -> DataLoader:
    """The training DataLoader of train_captcha.py, sized to n_batches."""
    ds = SyntheticCaptchaDataset(n_batches * args.batch_size, seed=args.seed, fresh_each_epoch=True)
    ds.set_epoch(epoch)
    # a new epoch's workers start with an empty photo cache; so does every measurement here
    generator._PHOTO_CACHE.clear()
    return DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def generator_throughput(args: Args, workers: int, n_batches: int) -> dict:
    dl = loader(args, workers, n_batches, epoch=1)
    start = time.perf_counter()
    it = iter(dl)
    next(it)
    first = time.perf_counter()
    for _ in it:
        pass
    end = time.perf_counter()
    n = n_batches * args.batch_size
    return {"gen_samples_per_s": n / (end - start), "first_batch_s": first - start,
            "gen_samples_per_s_steady": (n - args.batch_size) / (end - first) if n_batches > 1 else None}


def per_category(args: Args, n: int) -> list[dict]:
    ds = SyntheticCaptchaDataset(n, seed=args.seed, fresh_each_epoch=True)
    generator._PHOTO_CACHE.clear()  # start cold like a worker, whatever ran before
    times = {name: [] for name in CATEGORIES}
    for i in range(n):
        start = time.perf_counter()
        item = ds[i]
        times[CATEGORIES[int(item["category"])]].append(time.perf_counter() - start)
    rows = []
    for name, t in [*times.items(), ("all", sum(times.values(), []))]:
        ms = 1000 * np.asarray(t)
        rows.append({"category": name, "n": len(t), "ms_per_sample_mean": float(ms.mean()) if len(t) else None,
                     "ms_per_sample_median": float(np.median(ms)) if len(t) else None,
                     "ms_p90": float(np.percentile(ms, 90)) if len(t) else None})
    return rows


def end_to_end(args: Args, step, device, workers: int, n_steps: int) -> dict:
    """Training step fed by the DataLoader; the first batch (worker start-up) is timed apart."""
    dl = loader(args, workers, n_steps + 1, epoch=2)
    waits, totals = [], []
    start = fetch_start = time.perf_counter()
    first_batch_s = None
    for batch in dl:
        got = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
        if first_batch_s is None:
            first_batch_s = got - start
        else:
            waits.append(got - fetch_start)
            totals.append(done - fetch_start)
        fetch_start = time.perf_counter()
    return {"e2e_samples_per_s": len(totals) * args.batch_size / sum(totals),
            "e2e_data_wait_pct": 100 * sum(waits) / sum(totals), "e2e_first_batch_s": first_batch_s}


def verdict(workers: int, label: str, rows: dict, train_sps: float) -> str:
    if workers not in rows:
        return f"{label} (num_workers {workers}): not measured (add {workers} to --workers)."
    row = rows[workers]
    gen = row["gen_samples_per_s_steady"] or row["gen_samples_per_s"]
    parts = [f"generator {gen:.1f} samples/s alone vs training {train_sps:.1f} samples/s"]
    slow = gen < train_sps
    if row.get("e2e_data_wait_pct") is not None:
        wait = row["e2e_data_wait_pct"]
        parts.append(f"{wait:.0f}% of end-to-end time waiting for data")
        slow = slow or wait > 100 * WAIT_LIMIT
    answer = "the generator IS the bottleneck" if slow else "the generator is not the bottleneck"
    return f"{label} (num_workers {workers}): {answer} ({'; '.join(parts)})."


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    p.add_argument("--workers", default="0,1,2,4", help="DataLoader worker counts to measure")
    p.add_argument("--batches", type=int, default=30, help="batches per worker count (generator throughput)")
    p.add_argument("--category_samples", type=int, default=200,
                   help="single-process samples for the per-category table (rare categories are 5 percent)")
    p.add_argument("--train_samples_per_s", type=float, default=None,
                   help="training consumption to compare with; default: measure it here")
    p.add_argument("--train_steps", type=int, default=10, help="timed updates when measuring the consumption")
    p.add_argument("--e2e_steps", type=int, default=10,
                   help="updates fed by each worker count's DataLoader (0 = skip the end-to-end runs)")
    p.add_argument("--out", default=None, help="folder for captcha_data.md/.json")
    flags = p.parse_args()
    worker_counts = int_list(flags.workers, "--workers")
    positive("--batches", flags.batches)
    positive("--category_samples", flags.category_samples)
    positive("--train_steps", flags.train_steps)
    positive("--e2e_steps", flags.e2e_steps, 0)
    if flags.train_samples_per_s is not None:
        positive("--train_samples_per_s", flags.train_samples_per_s, 1e-9)
    if flags.threads:
        torch.set_num_threads(positive("--threads", flags.threads))
    args = train_args(flags)
    try:
        quick_workers = load_yaml_config(ROOT / QUICK_PRESET, Args).get("num_workers", Args.num_workers)
    except UsageError as e:
        fail(str(e))
    info = print_header("Synthetic CAPTCHA generator vs training consumption")
    # skimage is imported by the first photo background; pay it here, not inside one measurement
    import skimage.data  # noqa: F401

    rows = {}
    for w in worker_counts:
        rows[w] = {"workers": w, **generator_throughput(args, w, flags.batches)}
        print(f"  {w} workers: {rows[w]['gen_samples_per_s']:.1f} samples/s", flush=True)
    categories = per_category(args, flags.category_samples)

    step = device = None
    if flags.train_samples_per_s is None or flags.e2e_steps:
        accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
        device = accelerator.device
        torch.manual_seed(args.seed)
        step = make_ours_step(args, build_model(args), accelerator)
    if flags.train_samples_per_s is None:
        batches = fixed_batches(args, 2, device)
        timed(step, batches, 2, device)
        seconds = timed(step, batches, flags.train_steps, device)
        train_sps = args.batch_size / float(np.median(seconds))
        train_source = f"measured: median of {flags.train_steps} updates of train_captcha.py's step"
    else:
        train_sps = flags.train_samples_per_s
        train_source = "given by --train_samples_per_s"
    print(f"  training consumes {train_sps:.1f} samples/s ({train_source})", flush=True)
    for w in worker_counts:
        rows[w]["train_samples_per_s"] = train_sps
        gen = rows[w]["gen_samples_per_s_steady"] or rows[w]["gen_samples_per_s"]
        rows[w]["gen_over_train"] = gen / train_sps
        if flags.e2e_steps:
            rows[w].update(end_to_end(args, step, device, w, flags.e2e_steps))
            print(f"  {w} workers end to end: {rows[w]['e2e_samples_per_s']:.1f} samples/s, "
                  f"{rows[w]['e2e_data_wait_pct']:.0f}% waiting", flush=True)

    columns = ["workers", "gen_samples_per_s", "gen_samples_per_s_steady", "first_batch_s", "train_samples_per_s",
               "gen_over_train"]
    if flags.e2e_steps:
        columns += ["e2e_samples_per_s", "e2e_data_wait_pct", "e2e_first_batch_s"]
    notes = [
        verdict(quick_workers, QUICK_PRESET, rows, train_sps),
        verdict(Args.num_workers, "train_captcha.py default", rows, train_sps),
        f"Batch {args.batch_size}; generator: {flags.batches} batches per worker count; gen_samples_per_s includes "
        "worker start-up (first_batch_s, paid once per epoch), _steady excludes the first batch. Photo caches are "
        "emptied before each measurement, as a new epoch's workers start with none.",
        f"Training consumption {train_sps:.1f} samples/s ({train_source}; model fpn {args.fpn_channels}, heads "
        f"{args.head_channels}, channels_last {args.channels_last}, device {device or 'n/a'}).",
        "Bottleneck = generator alone slower than training, or end-to-end data wait above "
        f"{100 * WAIT_LIMIT:.0f}% of the time (end to end: {flags.e2e_steps} updates after the first batch; "
        "e2e_first_batch_s is the worker start-up)." if flags.e2e_steps else
        "Bottleneck = generator alone slower than training (end-to-end runs skipped: --e2e_steps 0).",
        f"Per category: {flags.category_samples} single-process SyntheticCaptchaDataset items (generate + letterbox "
        "+ tensors); the first photo of each kind also pays its load from skimage.data (see the mean vs median).",
    ]
    report("captcha_data", "Synthetic generator throughput vs training consumption", info,
           [table(list(rows.values()), columns, "DataLoader throughput (samples/s)",
                  formats={"first_batch_s": ".2f", "e2e_first_batch_s": ".2f", "gen_over_train": ".2f",
                           "e2e_data_wait_pct": ".1f"}),
            table(categories, ["category", "n", "ms_per_sample_mean", "ms_per_sample_median", "ms_p90"],
                  "Single-process generation time per confusion category (ms/sample)", fmt=".1f")],
           notes, flags.out, extra={"batch_size": args.batch_size, "train_samples_per_s": train_sps})


if __name__ == "__main__":
    main()
