"""Overhead of train_vqa.py's training step against a bare PyTorch loop on the same BLIP, and answer tokens/s.

    python benchmarks/vqa_step.py [--config configs/vqa_cpu.yaml --batch_size 64] [--out bench_out]

"ours" is one update as train_vqa.py's loop runs it: its own ``train_step`` (imported, not copied: the
Accelerator-prepared model and optimizer, ``accelerator.accumulate``, the answer-token loss normalised by the
update's token count, ``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer step/zero_grad),
then the loop's per-update work (``benchmarks.common.loop_update``: loss-window sums, the finite check of the
gradient norm, the scheduler step). The token count that ``with_token_counts`` attaches is computed when the
batches are made, as the loop reads it ahead. "bare" is model.train(), transformers' own BLIP forward with
labels (its micro-batch mean loss), backward, ``torch.nn.utils.clip_grad_norm_`` and AdamW. Both start from the
same weights and get the same pre-made batches of easy-VQA training questions (image decoding and
tokenisation excluded), in alternating rounds whose order flips every round. Target: ours/bare <= 1.05.
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

from benchmarks.common import (add_step_flags, bare_update, check_step_flags, loop_update, preset_args,
                               step_methods, step_overhead_report)
from data.vqa import VQACollate, VQADataset, export_easy_vqa, num_answer_tokens
from train_vqa import MODEL_INPUTS, Args, build_scheduler, scratch_spec, train_step
from training.export import build_model


def train_args(flags) -> Args:
    """train_vqa.py's Args from the preset plus the benchmark's overrides (one update per micro-batch)."""
    return preset_args(flags, Args, ("batch_size", "mixed_precision"), model="scratch")


def fixed_batches(args: Args, n: int, device, data_dir: Path) -> tuple[list[dict], dict, object]:
    """n training batches of easy-VQA questions on the device (with their update's token count), the model
    record and the processor, built as train_vqa.py builds them."""
    train = VQADataset(data_dir / "train.jsonl", max_samples=max(n * args.batch_size, 512))
    model_json, processor = scratch_spec(args, train)
    collate = VQACollate(processor, args.answer_max_length)
    batches = []
    for b in range(n):
        batch = collate([train[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
        batch = {k: batch[k].to(device) for k in MODEL_INPUTS}
        batch["num_items"] = num_answer_tokens(batch["labels"]).float()
        batches.append(batch)
    return batches, model_json, processor


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/vqa_cpu.yaml",
                   help="training preset for the model and optimizer; 'none' = train_vqa.py defaults")
    p.add_argument("--batch_size", type=int, default=None, help="questions per update (default: the preset's)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default=None,
                   help="default: the preset's value, else no (bf16 needs a GPU or a recent CPU)")
    p.add_argument("--data_dir", default=None,
                   help="a python -m data.vqa build folder (default: built into a temporary folder, ~3 s)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_step_flags(p)
    flags = p.parse_args()
    check_step_flags(flags)
    args = train_args(flags)

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(flags.data_dir) if flags.data_dir else Path(tmp) / "vqa"
        if not flags.data_dir:
            export_easy_vqa(data_dir)
        batches, model_json, _ = fixed_batches(args, flags.distinct_batches, device, data_dir)
    torch.manual_seed(args.seed)
    base = build_model(model_json)
    n_params = sum(p.numel() for p in base.parameters())
    total = (flags.warmup + flags.rounds * flags.steps) * (2 if flags.previous_check else 1)

    def make_ours(model, check):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        return loop_update(train_step, model, optimizer, accelerator, args, lambda b: b["input_ids"].shape[0],
                           scheduler=build_scheduler(optimizer, args, total), check=check)

    def make_bare(model):
        return bare_update(model, args, device, lambda m, b: m(**{k: b[k] for k in MODEL_INPUTS}),
                           lambda out, b: (out.loss, {}))

    steps = step_methods(make_ours, make_bare, base, flags.previous_check)
    tokens = sum(int(b["num_items"]) for b in batches) / len(batches)
    print(f"model {n_params / 1e6:.3f} M parameters, batch {args.batch_size} ({tokens:.0f} answer tokens), mixed "
          f"precision {accelerator.mixed_precision}, device {device}", flush=True)
    note = (f"BlipVQA {n_params / 1e6:.3f} M parameters (hidden {args.hidden}, {args.layers} text layers, "
            f"{args.vision_layers} vision layers, {args.image_size} px images in {args.patch_size} px patches), "
            f"batch {args.batch_size} questions ({tokens:.0f} answer tokens on average), mixed precision "
            f"{accelerator.mixed_precision}, device {device}; preset {args.config or 'train_vqa.py defaults'}.")
    step_overhead_report("vqa_step", "train_vqa.py", steps, batches, flags, args.batch_size, device, note,
                         unit="questions")


if __name__ == "__main__":
    main()
