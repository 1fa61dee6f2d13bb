"""Overhead of train_pair.py's training step against a bare PyTorch loop on the same model.

    python benchmarks/pair_step.py [--config configs/pair_fusion.yaml --width_mult 0.5 --batch_size 64] [--out bench_out]

"ours" repeats, per update, the body of train_pair.py's loop: the Accelerator-prepared
model and optimizer, ``accelerator.accumulate``, the task loss, the finiteness check
through ``accelerator.reduce`` (a host sync every update), ``accelerator.backward``,
``accelerator.clip_grad_norm_``, optimizer step/zero_grad, the cosine scheduler step and
the loss-window sums. Logging, evaluation and checkpointing (every N updates) are left out.
"bare" is model.train(), forward, the same loss, backward, ``torch.nn.utils.clip_grad_norm_``
and AdamW. Both start from the same weights and get the same pre-loaded batches (data
loading excluded), in alternating rounds whose order flips every round. Target: ours/bare <= 1.05.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import copy
import tempfile

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from benchmarks.common import alternate_rounds, positive, print_header, report, stats_ms, table
from data.pair import PairNPZDataset, build_pair_splits
from train_pair import Args, build_model, compute_loss
from training.config import UsageError, fail, load_yaml_config

TARGET_RATIO = 1.05


def train_args(flags) -> Args:
    """train_pair.py's Args from the preset plus the benchmark's overrides (one update per micro-batch)."""
    config = None if str(flags.config).lower() == "none" else flags.config
    if config and not Path(config).exists() and (ROOT / config).exists():
        config = str(ROOT / config)
    try:
        values = load_yaml_config(config, Args) if config else {}
        for name in ("batch_size", "width_mult", "mixed_precision"):
            if getattr(flags, name) is not None:
                values[name] = getattr(flags, name)
        values.update(config=flags.config if config else None, cpu=flags.cpu or not torch.cuda.is_available(),
                      grad_accum=1, num_workers=0, report_to="none", lr_schedule="cosine")
        return Args(**values)
    except UsageError as e:
        fail(str(e))


def fixed_batches(args: Args, n: int, device) -> list[dict]:
    """n augmented training batches from a small built dataset, already on the device."""
    with tempfile.TemporaryDirectory() as tmp:
        build_pair_splits(tmp, train_pairs=n * args.batch_size, val_pairs=20, test_pairs=20, seed=args.seed)
        ds = PairNPZDataset(Path(tmp) / "train.npz", augment=args.augment)
        batches = [default_collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
                   for b in range(n)]
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


def make_ours_step(args: Args, model, accelerator: Accelerator, total_steps: int):
    """One call = one update of train_pair.py's loop (without its every-N logging, eval and saving)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=args.min_lr)
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "samples": 0}
    parts_sum: dict[str, torch.Tensor] = {}
    state = {"global_step": 0}
    model.train()

    def step(batch: dict) -> None:
        with accelerator.accumulate(model):
            logits = model(batch["a"], batch["b"])
            loss, parts = compute_loss(logits, batch["label"], args)
            finite = torch.isfinite(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window["loss"] += loss.detach()
        window["micro"] += 1
        window["samples"] += batch["a"].shape[0] * accelerator.num_processes
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0) + value
        if accelerator.reduce(finite.float().logical_not().float(), "sum").item() > 0:
            raise RuntimeError(f"non-finite loss at update {state['global_step'] + 1}")
        if not accelerator.sync_gradients:
            return
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state["global_step"] += 1

    return step


def make_bare_step(args: Args, model, device: torch.device):
    """The same update in plain PyTorch: no Accelerate, scheduler or host sync."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    bf16 = args.mixed_precision == "bf16"

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["a"], batch["b"])
        loss, _ = compute_loss(logits, batch["label"], args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/pair_fusion.yaml",
                   help="training preset for the model, loss and optimizer; 'none' = train_pair.py defaults")
    p.add_argument("--batch_size", type=int, default=None, help="pairs per update (default: the preset's)")
    p.add_argument("--width_mult", type=float, default=None, help="encoder width (default: the preset's)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None,
                   help="default: the preset's value, else no (bf16 needs a GPU or a recent CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=20, help="timed updates per method per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per method before the first round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the order flips every round")
    p.add_argument("--distinct_batches", type=int, default=4, help="pre-loaded batches, cycled")
    p.add_argument("--out", default=None, help="folder for pair_step.md/.json")
    flags = p.parse_args()
    for name in ("steps", "rounds", "distinct_batches"):
        positive(f"--{name}", getattr(flags, name))
    positive("--warmup", flags.warmup, 0)
    if flags.threads:
        torch.set_num_threads(positive("--threads", flags.threads))
    args = train_args(flags)
    info = print_header("Training step: train_pair.py vs bare PyTorch")

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    base = build_model(args)
    n_params = sum(p.numel() for p in base.parameters())
    batches = fixed_batches(args, flags.distinct_batches, device)
    total = flags.warmup + flags.rounds * flags.steps
    steps = {"ours": make_ours_step(args, copy.deepcopy(base), accelerator, total),
             "bare": make_bare_step(args, copy.deepcopy(base), device)}
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, mixed precision "
          f"{accelerator.mixed_precision}, device {device}", flush=True)
    seconds, round_medians = alternate_rounds(steps, batches, flags.warmup, flags.rounds, flags.steps, device)

    summary = {name: stats_ms(s) for name, s in seconds.items()}
    ratio = summary["ours"]["median"] / summary["bare"]["median"]
    paired = [o / b for o, b in zip(round_medians["ours"], round_medians["bare"])]
    labels = {"ours": "ours (train_pair.py step)", "bare": "bare PyTorch"}
    rows = [{"method": labels[name], "ms_per_step_median": s["median"], "ms_p10": s["p10"], "ms_p90": s["p90"],
             "pairs_per_s": 1000 * args.batch_size / s["median"], "steps_timed": s["n"],
             "ratio_vs_bare": s["median"] / summary["bare"]["median"]} for name, s in summary.items()]
    columns = ["method", "ms_per_step_median", "ms_p10", "ms_p90", "pairs_per_s", "steps_timed", "ratio_vs_bare"]
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    notes = [
        f"ResNetCompareNet {n_params / 1e6:.3f} M parameters (arch {args.arch}, layers {args.layers}, width "
        f"{args.width_mult}, {args.attention}, fusion {args.fusion}), loss {args.loss}, batch {args.batch_size}, "
        f"mixed precision {accelerator.mixed_precision}, device {device}; preset {args.config or 'train_pair.py defaults'}.",
        f"ours/bare = {ratio:.3f} (median of all timed steps): {verdict} the target <= {TARGET_RATIO}. "
        f"Per-round ratios: {', '.join(f'{q:.3f}' for q in paired)}.",
        f"{flags.rounds} rounds x {flags.steps} updates per method after {flags.warmup} warm-up updates; "
        f"{flags.distinct_batches} pre-loaded batches cycled (data loading excluded).",
    ]
    report("pair_step", "Training step overhead (ms per update)", info,
           [table(rows, columns, formats={"ratio_vs_bare": ".3f", "pairs_per_s": ".1f"})], notes, flags.out,
           extra={"round_medians_ms": round_medians, "ratio": ratio, "paired_round_ratios": paired,
                  "params": n_params, "median_ratio_of_rounds": float(np.median(paired))})


if __name__ == "__main__":
    main()
