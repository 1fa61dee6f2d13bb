"""Overhead of train_captcha.py's training step against a bare PyTorch loop on the same model.

    python benchmarks/captcha_step.py [--batch_size 8 --steps 20 --warmup 3 --rounds 3] [--out bench_out]

"ours" repeats, per update, exactly the body of train_captcha.py's loop: the Accelerator-
prepared model and optimizer, ``accelerator.accumulate``, ``captcha_loss``, the finiteness
check through ``accelerator.reduce`` (a host sync every update), ``accelerator.backward``,
``accelerator.clip_grad_norm_``, optimizer step/zero_grad, the scheduler step, the
ModelEmaV3 update and the loss-window sums. Only logging, evaluation and checkpointing
(every N updates) are left out. "bare" is model.train(), forward, the same ``captcha_loss``,
backward, ``torch.nn.utils.clip_grad_norm_`` and AdamW.

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
import copy

import numpy as np
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import default_collate

from benchmarks.common import alternate_rounds, positive, print_header, report, stats_ms, table
from data.captcha import SyntheticCaptchaDataset
from losses.captcha import captcha_loss
from models.lite_hrnet import LiteHRNet18FPN
from train_captcha import Args, build_scheduler, loss_kwargs, set_train_mode, to_input
from training.config import UsageError, fail, load_yaml_config

TARGET_RATIO = 1.05


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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")


def train_args(flags) -> Args:
    """train_captcha.py's Args from the preset plus the benchmark's overrides (one update per micro-batch)."""
    config = None if str(flags.config).lower() == "none" else flags.config
    if config and not Path(config).exists() and (ROOT / config).exists():
        config = str(ROOT / config)  # the default preset, also when run from outside the repo
    try:
        values = load_yaml_config(config, Args) if config else {}
        for name in ("batch_size", "fpn_channels", "head_channels", "channels_last", "mixed_precision"):
            if getattr(flags, name) is not None:
                values[name] = getattr(flags, name)
        values.update(config=flags.config if config else None, cpu=flags.cpu or not torch.cuda.is_available(),
                      grad_accum=1, num_workers=0, report_to="none")
        return Args(**values)
    except UsageError as e:
        fail(str(e))


def build_model(args: Args) -> LiteHRNet18FPN:
    model = LiteHRNet18FPN(in_chans=4, fpn_channels=args.fpn_channels, head_channels=args.head_channels,
                           with_angle=args.with_angle)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def fixed_batches(args: Args, n: int, device) -> list[dict]:
    """n training batches generated once (epoch 0 of the training seed), already on the device."""
    ds = SyntheticCaptchaDataset(n * args.batch_size, seed=args.seed, fresh_each_epoch=True)
    batches = []
    for b in range(n):
        batch = default_collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def make_ours_step(args: Args, model, accelerator: Accelerator):
    """One call = one update of train_captcha.py's loop (without its every-N logging, eval and saving)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, args)
    ema = (ModelEmaV3(accelerator.unwrap_model(model), decay=args.ema_decay, use_warmup=True, warmup_power=3 / 4)
           if args.ema_decay > 0 else None)
    kwargs = loss_kwargs(args)
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0, "samples": 0}
    parts_sum: dict[str, torch.Tensor] = {}
    state = {"global_step": 0}
    set_train_mode(model, args.freeze_bn)

    def step(batch: dict) -> None:
        with accelerator.accumulate(model):
            outputs = model(to_input(batch["image"], args))
            loss, parts = captcha_loss(outputs, batch, **kwargs)
            finite = torch.isfinite(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window["loss"] += loss.detach()
        window["micro"] += 1
        window["samples"] += batch["image"].shape[0] * accelerator.num_processes
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0) + value
        if accelerator.reduce(finite.float().logical_not().float(), "sum").item() > 0:
            raise RuntimeError(f"non-finite loss at update {state['global_step'] + 1}")
        if not accelerator.sync_gradients:
            return
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state["global_step"] += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=state["global_step"])

    return step


def make_bare_step(args: Args, model, device: torch.device):
    """The same update in plain PyTorch: no Accelerate, scheduler, EMA or host sync."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    kwargs = loss_kwargs(args)
    bf16 = args.mixed_precision == "bf16"

    def step(batch: dict) -> None:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if args.channels_last else batch["image"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(image)
        loss, _ = captcha_loss(outputs, batch, **kwargs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p)
    p.add_argument("--steps", type=int, default=20, help="timed updates per method per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per method before the first round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the order flips every round")
    p.add_argument("--distinct_batches", type=int, default=4, help="pre-generated batches, cycled")
    p.add_argument("--out", default=None, help="folder for captcha_step.md/.json")
    flags = p.parse_args()
    for name in ("steps", "rounds", "distinct_batches", "batch_size"):
        positive(f"--{name}", getattr(flags, name))
    positive("--warmup", flags.warmup, 0)
    if flags.threads:
        torch.set_num_threads(positive("--threads", flags.threads))
    args = train_args(flags)
    info = print_header("Training step: train_captcha.py vs bare PyTorch")

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(args.seed)
    base = build_model(args)
    n_params = sum(p.numel() for p in base.parameters())
    batches = fixed_batches(args, flags.distinct_batches, device)
    steps = {"ours": make_ours_step(args, copy.deepcopy(base), accelerator),
             "bare": make_bare_step(args, copy.deepcopy(base), device)}
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, channels_last {args.channels_last}, "
          f"mixed precision {accelerator.mixed_precision}, device {device}", flush=True)

    seconds, round_medians = alternate_rounds(steps, batches, flags.warmup, flags.rounds, flags.steps, device)

    summary = {name: stats_ms(s) for name, s in seconds.items()}
    ratio = summary["ours"]["median"] / summary["bare"]["median"]
    paired = [o / b for o, b in zip(round_medians["ours"], round_medians["bare"])]
    labels = {"ours": "ours (train_captcha.py step)", "bare": "bare PyTorch"}
    rows = [{"method": labels[name], "ms_per_step_median": s["median"], "ms_p10": s["p10"], "ms_p90": s["p90"],
             "samples_per_s": 1000 * args.batch_size / s["median"], "steps_timed": s["n"],
             "ratio_vs_bare": s["median"] / summary["bare"]["median"]} for name, s in summary.items()]
    columns = ["method", "ms_per_step_median", "ms_p10", "ms_p90", "samples_per_s", "steps_timed", "ratio_vs_bare"]
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    notes = [
        f"LiteHRNet18FPN {n_params / 1e6:.3f} M parameters (fpn {args.fpn_channels}, heads {args.head_channels}, "
        f"angle head {args.with_angle}), batch {args.batch_size}, 512x256 input, channels_last {args.channels_last}, "
        f"mixed precision {accelerator.mixed_precision}, device {device}; "
        f"preset {args.config or 'train_captcha.py defaults'}.",
        f"ours/bare = {ratio:.3f} (median of all timed steps): {verdict} the target <= {TARGET_RATIO}. "
        f"Per-round ratios: {', '.join(f'{q:.3f}' for q in paired)}.",
        f"{flags.rounds} rounds x {flags.steps} updates per method after {flags.warmup} warm-up updates; "
        f"{flags.distinct_batches} pre-generated batches cycled (data loading excluded).",
    ]
    report("captcha_step", "Training step overhead (ms per update)", info,
           [table(rows, columns, formats={"ratio_vs_bare": ".3f", "samples_per_s": ".1f"})], notes, flags.out,
           extra={"round_medians_ms": round_medians, "ratio": ratio, "paired_round_ratios": paired})


if __name__ == "__main__":
    main()
