"""Overhead of train_smlm.py's training step against a bare PyTorch loop on the same model.

    python benchmarks/smlm_step.py [--config configs/smlm_cpu.yaml --batch_size 64] [--out bench_out]

"ours" is one update as train_smlm.py's loop runs it: its own ``train_step`` (imported, not copied:
the Accelerator-prepared SigmaMUNet and optimizer, ``accelerator.accumulate``, the Gaussian-mixture
loss, ``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer step/zero_grad), then the
loop's per-update work (``benchmarks.common.loop_update``): the loss-window sums, the finite check of
the gradient norm (one host sync per update) and the StepLR step. Logging, evaluation and checkpointing
(every N updates) are left out. "bare" is model.train(), forward, the same ``gmm_loss``, backward,
``torch.nn.utils.clip_grad_norm_`` and AdamW. ``--previous_check`` adds the loop as it was before (an
all-reduced finite-loss flag and a host sync every micro-batch). All start from the same weights and get
the same pre-simulated windows (simulation excluded; ``smlm_throughput.py`` measures it), in alternating
rounds whose order flips every round. Target: ours/bare <= 1.05.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse

import torch
from accelerate import Accelerator

from benchmarks.common import (add_step_flags, bare_update, check_step_flags, loop_update, positive,
                               step_methods, step_overhead_report)
from data.smlm import SMLMSimDataset, collate_smlm
from losses.smlm import gmm_loss
from models.sigma_munet import SigmaMUNet
from train_smlm import model_kwargs, parse_smlm_args, train_step


def fixed_batches(cfg, args, n: int, device) -> list[dict]:
    """n training batches simulated once (epoch 0 of the training seed), already on the device."""
    ds = SMLMSimDataset(cfg, n * args.batch_size, seed=args.seed, window=args.window)
    batches = [collate_smlm([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]) for b in range(n)]
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


def make_ours_step(args, model, accelerator: Accelerator, check: str = "update"):
    """One call = one update of train_smlm.py's loop (without its every-N logging, eval and saving)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # train_smlm.py's StepLR: the step size (epochs x updates per epoch) only sets when the lr drops, not the cost.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_epochs * 1000, gamma=args.lr_gamma)
    model.train()
    return loop_update(train_step, model, optimizer, accelerator, args, lambda batch: batch["frames"].shape[0],
                       scheduler=scheduler, check=check)


def make_bare_step(args, model, device: torch.device):
    """The same update in plain PyTorch: no Accelerate, scheduler or host sync."""
    def loss_of(output, batch):
        return gmm_loss(output.float(), batch["target_emitters"], batch["target_mask"], batch["target_bg"],
                        count_times_num_emitters=args.count_times_num_emitters)

    return bare_update(model, args, device, lambda model, batch: model(batch["frames"]), loss_of)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/smlm_cpu.yaml", help="train_smlm.py preset (model, loss, simulation)")
    p.add_argument("--batch_size", type=int, default=None, help="windows per update (default: the preset's)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None,
                   help="default: the preset's value, else no (bf16 needs a GPU or a recent CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_step_flags(p)
    flags = p.parse_args()
    check_step_flags(flags)
    config = flags.config if Path(flags.config).exists() or not (ROOT / flags.config).exists() else str(ROOT / flags.config)
    argv = ["--config", config, "--report_to", "none", "--grad_accum", "1", "--num_workers", "0"]
    if flags.batch_size is not None:
        argv += ["--batch_size", str(positive("--batch_size", flags.batch_size))]
    if flags.mixed_precision is not None:
        argv += ["--mixed_precision", flags.mixed_precision]
    args, cfg = parse_smlm_args(argv)

    accelerator = Accelerator(cpu=flags.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    base = SigmaMUNet(**model_kwargs(args))
    n_params = sum(p.numel() for p in base.parameters())
    batches = fixed_batches(cfg, args, flags.distinct_batches, device)
    steps = step_methods(lambda model, check: make_ours_step(args, model, accelerator, check),
                         lambda model: make_bare_step(args, model, device), base, flags.previous_check)
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, {cfg.img_size[0]}x{cfg.img_size[1]} px, "
          f"mixed precision {accelerator.mixed_precision}, device {device}", flush=True)
    note = (f"SigmaMUNet {n_params / 1e6:.3f} M parameters ({args.initial_features} features, depth "
            f"{args.depth_shared}/{args.depth_union}, {args.window} frames), batch {args.batch_size} windows of "
            f"{cfg.img_size[0]}x{cfg.img_size[1]} px, mixed precision {accelerator.mixed_precision}, device {device}; "
            f"preset {flags.config}.")
    step_overhead_report("smlm_step", "train_smlm.py", steps, batches, flags, args.batch_size, device, note,
                         unit="windows")


if __name__ == "__main__":
    main()
