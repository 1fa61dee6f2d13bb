"""Overhead of train_pair.py's training step against a bare PyTorch loop on the same model.

    python benchmarks/pair_step.py [--config configs/pair_fusion.yaml --width_mult 0.5 --batch_size 64] [--out bench_out]

"ours" is one update as train_pair.py's loop runs it: its own ``train_step`` (imported, not copied:
the Accelerator-prepared model and optimizer, ``accelerator.accumulate``, the task loss,
``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer step/zero_grad), then the loop's
per-update work (``benchmarks.common.loop_update``): the loss-window sums, the finite check of the
gradient norm (one host sync per update) and the cosine scheduler step. Logging, evaluation and
checkpointing (every N updates) are left out. "bare" is model.train(), forward, the same loss,
backward, ``torch.nn.utils.clip_grad_norm_`` and AdamW. ``--previous_check`` adds the loop as it was
before (an all-reduced finite-loss flag and a host sync every micro-batch). All start from the same
weights and get the same pre-loaded batches (data loading excluded), in alternating rounds whose
order flips every round. Target: ours/bare <= 1.05.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import tempfile

import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from benchmarks.common import (add_step_flags, bare_update, check_step_flags, loop_update, preset_args,
                               step_methods, step_overhead_report)
from data.pair import PairNPZDataset, build_pair_splits
from models.compare_net import ResNetCompareNet
from train_pair import Args, compute_loss, model_kwargs, train_step


def train_args(flags) -> Args:
    """train_pair.py's Args from the preset plus the benchmark's overrides (one update per micro-batch)."""
    return preset_args(flags, Args, ("batch_size", "width_mult", "mixed_precision"), lr_schedule="cosine")


def fixed_batches(args: Args, n: int, device) -> list[dict]:
    """n augmented training batches from a small built dataset, already on the device."""
    with tempfile.TemporaryDirectory() as tmp:
        build_pair_splits(tmp, train_pairs=n * args.batch_size, val_pairs=20, test_pairs=20, seed=args.seed)
        ds = PairNPZDataset(Path(tmp) / "train.npz", augment=args.augment)
        batches = [default_collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
                   for b in range(n)]
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


def make_ours_step(args: Args, model, accelerator: Accelerator, total_steps: int, check: str = "update"):
    """One call = one update of train_pair.py's loop (without its every-N logging, eval and saving)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=args.min_lr)
    model.train()
    return loop_update(train_step, model, optimizer, accelerator, args, lambda batch: batch["a"].shape[0],
                       scheduler=scheduler, check=check)


def make_bare_step(args: Args, model, device: torch.device):
    """The same update in plain PyTorch: no Accelerate, scheduler or host sync."""
    return bare_update(model, args, device, lambda model, batch: model(batch["a"], batch["b"], return_digits=args.aux_digit_weight > 0),
                       lambda logits, batch: compute_loss(logits, batch, args))


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
    add_step_flags(p)
    flags = p.parse_args()
    check_step_flags(flags)
    args = train_args(flags)

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    base = ResNetCompareNet(**model_kwargs(args))
    n_params = sum(p.numel() for p in base.parameters())
    batches = fixed_batches(args, flags.distinct_batches, device)
    total = (flags.warmup + flags.rounds * flags.steps) * (2 if flags.previous_check else 1)
    steps = step_methods(lambda model, check: make_ours_step(args, model, accelerator, total, check),
                         lambda model: make_bare_step(args, model, device), base, flags.previous_check)
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, mixed precision "
          f"{accelerator.mixed_precision}, device {device}", flush=True)
    note = (f"ResNetCompareNet {n_params / 1e6:.3f} M parameters (arch {args.arch}, layers {args.layers}, width "
            f"{args.width_mult}, {args.attention}, fusion {args.fusion}), loss {args.loss}, batch {args.batch_size}, "
            f"mixed precision {accelerator.mixed_precision}, device {device}; "
            f"preset {args.config or 'train_pair.py defaults'}.")
    step_overhead_report("pair_step", "train_pair.py", steps, batches, flags, args.batch_size, device, note,
                         unit="pairs")


if __name__ == "__main__":
    main()
