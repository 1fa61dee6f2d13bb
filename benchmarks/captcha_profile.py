"""Where train_captcha.py's training update spends its time, and what each speed lever buys.

    python benchmarks/captcha_profile.py [--batch_size 8 --steps 4 --rounds 3] [--compile] [--out bench_out]

Table 1 (profile): one update of the preset's model (``configs/captcha_quick.yaml``: train mode, NHWC,
FPN/heads 32 channels, on the 512x256 canvas: a preset's input_scale and small_canvas_steps are set aside,
they are levers of table 2) split into its parts. Each part of the network (the stem, each of the three
stages with the transition in front of it, the FPN, the four heads) is run on its own real input (saved
from a full forward pass, detached) and timed forward, then backward with a random output gradient; the loss
(``captcha_loss`` on detached outputs) and the optimizer (gradient clipping plus AdamW over all parameters)
likewise. The parts' sum is compared with a full update measured in the same run (the difference is
autograd's bookkeeping between parts).

Table 2 (levers): samples per second of the whole update (forward, loss, backward, clipping, AdamW) for each
variant, timed in alternating rounds (the order reversed every round) on the same batches, so drifts of the
machine hit all alike: the preset; NCHW instead of NHWC; FPN/heads at 16 and 64 channels; one thread instead
of two; the canvas halved to 256x128 (the first phase of progressive resizing: the image area-downsampled,
every label halved, the heatmaps at stride 4 of the smaller canvas: ``data.captcha.halve_canvas``, what
``train_captcha.py --small_canvas_steps`` does); the model that shrinks the full canvas itself
(``--input_scale 2``: the same work plus the pooling inside the model and the loss at stride 8); with
``--compile`` also
``torch.compile`` of the preset's model (its compile time is reported apart).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch.utils.data import default_collate

from benchmarks.common import bare_update, positive, preset_args, print_header, report, stats_ms, table
from data.captcha import SyntheticCaptchaDataset, halve_canvas
from losses.captcha import captcha_loss
from models.lite_hrnet import LiteHRNet18FPN
# train_captcha's Args and settings, through the step benchmark that measures train_step against this bare update
from benchmarks.captcha_step import Args, loss_kwargs, model_kwargs

HEADS = ("gap_head", "slider_head", "offset_head", "angle_head")


def make_batches(n: int, batch_size: int, seed: int = 7) -> list[dict]:
    data = SyntheticCaptchaDataset(n * batch_size, seed=seed, fresh_each_epoch=False)
    return [default_collate([data[k * batch_size + i] for i in range(batch_size)]) for k in range(n)]


def to_memory_format(batch: dict, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return dict(batch, image=batch["image"].contiguous(memory_format=fmt))


def make_model(args: Args, fpn: int, head: int, channels_last: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LiteHRNet18FPN(**dict(model_kwargs(args), fpn_channels=fpn, head_channels=head))
    model.train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def update_fn(model, args: Args, threads: int | None = None):
    """One full update as train_captcha.py's step does it, without Accelerate (whose overhead
    benchmarks/captcha_step.py measures): common.bare_update, optionally on `threads` threads."""
    step = bare_update(model, args, torch.device("cpu"), lambda m, b: m(b["image"]),
                       lambda out, b: captcha_loss(out, b, **loss_kwargs(args)))
    if not threads:
        return step

    def on_threads(batch):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            step(batch)
        finally:
            torch.set_num_threads(previous)
    return on_threads


# ---------------------------------------------------------------------------- table 1: the parts

def _leaf(value):
    """Detached copies that require grad: the input of a part as the part sees it in a full forward."""
    if isinstance(value, (list, tuple)):
        return [_leaf(v) for v in value]
    return value.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def network_parts(model) -> list[tuple[str, callable]]:
    """(name, fn) in forward order; fn maps the previous part's output to this part's."""
    backbone = model.backbone

    def stage(i):
        def run(xs):
            xs = [xs] if torch.is_tensor(xs) else xs
            xs = [t(xs[min(j, len(xs) - 1)]) for j, t in enumerate(backbone.transitions[i])]
            return backbone.stages[i](xs)
        return run

    def heads(feat):
        return {name: getattr(model, name)(feat) for name in HEADS if getattr(model, name, None) is not None}

    parts = [("stem", backbone.stem)]
    parts += [(f"stage {i + 1} (transition + {len(backbone.stages[i])} modules, "
               f"{len(backbone.transitions[i])} branches)", stage(i)) for i in range(len(backbone.stages))]
    return parts + [("FPN", model.fpn), ("heads (gap, slider, offset, angle)", heads)]


def profile_parts(model, args: Args, batches: list[dict], steps: int) -> list[dict]:
    parts = network_parts(model)
    inputs = []
    with torch.no_grad():
        value = batches[0]["image"]
        for _, fn in parts:
            inputs.append(value)
            value = fn(value)
    rows = []
    for (name, fn), inp in zip(parts, inputs):
        fwd, bwd = [], []
        for k in range(steps + 1):   # the first call warms up
            leaf = _leaf(inp)
            start = time.perf_counter()
            out = fn(leaf)
            mid = time.perf_counter()
            outs = _tensors(out)
            torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
            end = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if k:
                fwd.append(mid - start)
                bwd.append(end - mid)
        rows.append({"part": name, "params": sum(p.numel() for n, p in model.named_parameters()
                                                 if _in_part(n, name)),
                     "forward ms": stats_ms(fwd)["median"], "backward ms": stats_ms(bwd)["median"]})

    # the loss on the outputs of a full forward, then the optimizer on real gradients
    kwargs = loss_kwargs(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_f, loss_b, optim = [], [], []
    for k in range(steps + 1):
        outputs = model(batches[k % len(batches)]["image"])
        leaves = {key: v.detach().requires_grad_(True) for key, v in outputs.items()}
        start = time.perf_counter()
        loss, _ = captcha_loss(leaves, batches[k % len(batches)], **kwargs)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        torch.autograd.backward(list(outputs.values()), [torch.randn_like(v) for v in outputs.values()])
        start_opt = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k:
            loss_f.append(mid - start)
            loss_b.append(end - mid)
            optim.append(time.perf_counter() - start_opt)
    rows.append({"part": "loss (captcha_loss)", "params": 0, "forward ms": stats_ms(loss_f)["median"],
                 "backward ms": stats_ms(loss_b)["median"]})
    rows.append({"part": "optimizer (clip + AdamW)", "params": sum(p.numel() for p in model.parameters()),
                 "forward ms": None, "backward ms": None, "step ms": stats_ms(optim)["median"]})
    total = sum((r["forward ms"] or 0) + (r["backward ms"] or 0) + r.get("step ms", 0) for r in rows)
    for r in rows:
        r["total ms"] = (r["forward ms"] or 0) + (r["backward ms"] or 0) + r.get("step ms", 0)
        r["share %"] = 100 * r["total ms"] / total
    rows.append({"part": "sum of the parts", "params": sum(p.numel() for p in model.parameters()),
                 "total ms": total, "share %": 100.0})
    return rows


def _in_part(param_name: str, part: str) -> bool:
    if part == "stem":
        return param_name.startswith("backbone.stem.")
    if part.startswith("stage "):
        i = int(part.split()[1]) - 1
        return param_name.startswith((f"backbone.stages.{i}.", f"backbone.transitions.{i}."))
    if part == "FPN":
        return param_name.startswith("fpn.")
    if part.startswith("heads"):
        return param_name.startswith(HEADS)
    return False


# ---------------------------------------------------------------------------- table 2: the levers

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/captcha_quick.yaml", help="training preset (lr, loss settings, widths)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed updates per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates per variant before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of table 2")
    p.add_argument("--batches", type=int, default=3, help="distinct pre-generated batches, cycled")
    p.add_argument("--compile", action="store_true", help="also torch.compile of the preset's model")
    p.add_argument("--skip_profile", action="store_true", help="only table 2")
    p.add_argument("--out", default=None, help="folder for captcha_profile.md/.json")
    flags = p.parse_args(argv)
    for flag in ("batch_size", "steps", "rounds", "batches"):
        positive(f"--{flag}", getattr(flags, flag))
    flags.cpu = True   # a CPU profile: the levers compared here are the CPU's
    # the full-canvas model: table 1 feeds the stem the 512x256 canvas, and the smaller canvases are levers
    args = dataclasses.replace(preset_args(flags, Args, ()), input_scale=1, small_canvas_steps=0)
    info = print_header("train_captcha.py update: profile by part and speed levers")
    threads = torch.get_num_threads()
    batches = make_batches(flags.batches, flags.batch_size)
    fpn, head, nhwc = args.fpn_channels, args.head_channels, args.channels_last
    tables, notes = [], []

    if not flags.skip_profile:
        model = make_model(args, fpn, head, nhwc)
        rows = profile_parts(model, args, [to_memory_format(b, nhwc) for b in batches], flags.steps)
        full = update_fn(make_model(args, fpn, head, nhwc), args)
        nb = [to_memory_format(b, nhwc) for b in batches]
        for b in nb[:1]:
            full(b)
        seconds = []
        for k in range(flags.steps):
            start = time.perf_counter()
            full(nb[k % len(nb)])
            seconds.append(time.perf_counter() - start)
        rows.append({"part": "full update (measured)", "total ms": stats_ms(seconds)["median"]})
        tables.append(table(rows, ["part", "params", "forward ms", "backward ms", "step ms", "total ms", "share %"],
                            f"Profile: one update, batch {flags.batch_size}, 512x256, "
                            f"{'NHWC' if nhwc else 'NCHW'}, FPN/heads {fpn}/{head}, {threads} thread(s)",
                            formats={"params": ",d", "share %": ".1f", "forward ms": ".1f", "backward ms": ".1f",
                                     "step ms": ".1f", "total ms": ".1f"}))

    variants = {   # name: FPN width, head width, NHWC, halve the batch, threads, input_scale
        f"preset (NHWC={nhwc}, FPN/heads {fpn}, 512x256, {threads} thread(s))": (fpn, head, nhwc, False, None, 1),
        f"NHWC={not nhwc}": (fpn, head, not nhwc, False, None, 1),
        "FPN/heads 16": (16, 16, nhwc, False, None, 1),
        "FPN/heads 64 (full preset)": (64, 64, nhwc, False, None, 1),
        "1 thread": (fpn, head, nhwc, False, 1, 1),
        "canvas 256x128 (progressive resizing, phase 1)": (fpn, head, nhwc, True, None, 1),
        "--input_scale 2 (the model pools the 512x256 canvas)": (fpn, head, nhwc, False, None, 2),
    }
    steps, inputs = {}, {}
    for name, (f, h, cl, small, th, scale) in variants.items():
        variant_args = dataclasses.replace(args, input_scale=scale)
        steps[name] = update_fn(make_model(variant_args, f, h, cl), variant_args, th)
        inputs[name] = [to_memory_format(halve_canvas(b) if small else b, cl) for b in batches]
    if flags.compile:
        name = "torch.compile (preset)"
        compiled = torch.compile(make_model(args, fpn, head, nhwc))
        start = time.perf_counter()
        update_fn(compiled, args)(inputs[next(iter(variants))][0])
        notes.append(f"torch.compile: first update (compilation) took {time.perf_counter() - start:.1f} s")
        steps[name], inputs[name] = update_fn(compiled, args), inputs[next(iter(variants))]
    seconds = {name: [] for name in steps}
    for name, step in steps.items():
        for k in range(flags.warmup):
            step(inputs[name][k % flags.batches])
    names = list(steps)
    for r in range(flags.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for k in range(flags.steps):
                start = time.perf_counter()
                steps[name](inputs[name][k % flags.batches])
                seconds[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{flags.rounds} done", flush=True)
    base = np.median(seconds[names[0]])
    rows = [{"variant": name, **{k: v for k, v in stats_ms(s).items() if k in ("median", "p10", "p90")},
             "samples/s": flags.batch_size / float(np.median(s)), "speed-up": base / float(np.median(s))}
            for name, s in seconds.items()]
    tables.append(table(rows, ["variant", "median", "p10", "p90", "samples/s", "speed-up"],
                        f"Levers: ms per update (batch {flags.batch_size}), alternating rounds",
                        formats={"speed-up": ".2f", "samples/s": ".1f", "median": ".1f", "p10": ".1f", "p90": ".1f"}))
    notes.append("speed-up: the preset's median ms per update over the variant's; more samples per second is not "
                 "better accuracy after equal wall time until a training run shows it")
    report("captcha_profile", "CAPTCHA training update: profile and levers", info, tables, notes, flags.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
