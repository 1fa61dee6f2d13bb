"""Overhead of train_captcha.py's training step against a bare PyTorch loop on the same model.

    python benchmarks/captcha_step.py [--batch_size 8 --steps 20 --warmup 3 --rounds 3] [--out bench_out]

"ours" is one update as train_captcha.py's loop runs it: its own ``train_step`` (imported, not
copied: the Accelerator-prepared model and optimizer, ``accelerator.accumulate``, ``captcha_loss``,
``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer step/zero_grad), then the
loop's per-update work (``benchmarks.common.loop_update``): the loss-window sums, the finite check
of the gradient norm (one host sync per update), the scheduler step and the ModelEmaV3 update.
Only logging, evaluation and checkpointing (every N updates) are left out. "bare" is
model.train(), forward, the same ``captcha_loss``, backward, ``torch.nn.utils.clip_grad_norm_``
and AdamW. ``--previous_check`` adds the loop as it was before, with an all-reduced finite-loss
flag and a host sync every micro-batch.

Both start from the same weights (deep copies) and get the same pre-generated batches, so
data loading is excluded. They run in one process in alternating rounds, the order flipped
every round (A B, B A, A B, ...), so drifts of the machine's speed hit both alike. The target
is ours/bare <= 1.05.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import default_collate

from benchmarks.common import (add_step_flags, bare_update, check_step_flags, loop_update, positive, preset_args,
                               step_methods, step_overhead_report)
from data.captcha import SyntheticCaptchaDataset
from losses.captcha import captcha_loss
from models.lite_hrnet import LiteHRNet18FPN
from train_captcha import Args, build_scheduler, loss_kwargs, model_kwargs, set_train_mode, train_step


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with captcha_data.py, which measures the same training step."""
    p.add_argument("--config", default="configs/captcha_quick.yaml",
                   help="training preset for lr, EMA, clipping and loss settings; 'none' = train_captcha.py defaults")
    p.add_argument("--batch_size", type=int, default=8, help="samples per update")
    p.add_argument("--fpn_channels", type=int, default=32)
    p.add_argument("--head_channels", type=int, default=32)
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC model and input (default: the preset's value)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None,
                   help="default: the preset's value, else no (bf16 needs a GPU or a recent CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def train_args(flags) -> Args:
    """train_captcha.py's Args from the preset plus the benchmark's overrides (one update per micro-batch)."""
    return preset_args(flags, Args, ("batch_size", "fpn_channels", "head_channels", "channels_last", "mixed_precision"))


def build_model(args: Args) -> LiteHRNet18FPN:
    model = LiteHRNet18FPN(**model_kwargs(args))
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def fixed_batches(args: Args, n: int, device) -> list[dict]:
    """n training batches generated once (epoch 0 of the training seed), already on the device."""
    ds = SyntheticCaptchaDataset(n * args.batch_size, seed=args.seed, fresh_each_epoch=True)
    batches = []
    for b in range(n):
        batch = default_collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def make_ours_step(args: Args, model, accelerator: Accelerator, check: str = "update"):
    """One call = one update of train_captcha.py's loop (without its every-N logging, eval and saving)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = (ModelEmaV3(accelerator.unwrap_model(model), decay=args.ema_decay, use_warmup=True, warmup_power=3 / 4)
           if args.ema_decay > 0 else None)
    set_train_mode(model, args.freeze_bn)
    return loop_update(train_step, model, optimizer, accelerator, args, lambda batch: batch["image"].shape[0],
                       scheduler=build_scheduler(optimizer, args), ema=ema, check=check)


def make_bare_step(args: Args, model, device: torch.device):
    """The same update in plain PyTorch: no Accelerate, scheduler, EMA or host sync."""
    kwargs = loss_kwargs(args)

    def forward(model, batch):
        image = batch["image"]
        return model(image.contiguous(memory_format=torch.channels_last) if args.channels_last else image)

    return bare_update(model, args, device, forward, lambda outputs, batch: captcha_loss(outputs, batch, **kwargs))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    add_step_flags(p)
    flags = p.parse_args()
    positive("--batch_size", flags.batch_size)
    check_step_flags(flags)
    args = train_args(flags)

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    base = build_model(args)
    n_params = sum(p.numel() for p in base.parameters())
    batches = fixed_batches(args, flags.distinct_batches, device)
    steps = step_methods(lambda model, check: make_ours_step(args, model, accelerator, check),
                         lambda model: make_bare_step(args, model, device), base, flags.previous_check)
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, channels_last {args.channels_last}, "
          f"mixed precision {accelerator.mixed_precision}, device {device}", flush=True)
    note = (f"LiteHRNet18FPN {n_params / 1e6:.3f} M parameters (fpn {args.fpn_channels}, heads {args.head_channels}, "
            f"angle head {args.with_angle}), batch {args.batch_size}, 512x256 input, channels_last "
            f"{args.channels_last}, mixed precision {accelerator.mixed_precision}, device {device}; "
            f"preset {args.config or 'train_captcha.py defaults'}.")
    step_overhead_report("captcha_step", "train_captcha.py", steps, batches, flags, args.batch_size, device, note)


if __name__ == "__main__":
    main()
