"""Shared plumbing of the benchmark scripts: the machine, the command line, timing statistics,
the Markdown/JSON report, and for the *_step.py benchmarks the pieces they compare (one update
of a train script's loop around its own ``train_step``, the bare PyTorch reference update, the
alternating timing rounds and the overhead table).

Every benchmark prints the machine and its exact command line before it starts and a
Markdown table at the end, and with ``--out DIR`` also writes ``DIR/<name>.md`` and
``DIR/<name>.json``, so the tables of README and docs/ can be copied from a file that says
where they came from.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.config import UsageError, fail, load_yaml_config

TARGET_RATIO = 1.05  # ours/bare: the loop's bookkeeping may cost at most 5 % of an update


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": ", ".join(gpus) if gpus else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpus else None,
        "python": platform.python_version(),
    }


def command_line() -> str:
    """The command as typed, with the thread settings that change the numbers in front."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    return " ".join(filter(None, [env, "python", shlex.join(sys.argv)]))


def machine_lines(info: dict) -> list[str]:
    gpu = info["gpu"] or "none"
    if info["cuda"]:
        gpu += f" (CUDA {info['cuda']})"
    cores = f"{info['cpu_cores']} cores"
    if info["cpu_cores_usable"] != info["cpu_cores"]:
        cores += f" ({info['cpu_cores_usable']} usable)"
    return [f"**Machine:** {info['cpu']}, {cores}, torch {info['torch']} with {info['torch_threads']} threads"
            f" (OMP_NUM_THREADS={info['omp_num_threads'] or 'unset'}), GPU: {gpu}",
            f"**Command:** `{command_line()}`"]


def print_header(title: str) -> dict:
    """Print what is measured and where; returns the machine dict for the report."""
    info = machine_info()
    print(f"# {title}")
    for line in machine_lines(info):
        print(line)
    print(flush=True)
    return info


def int_list(text: str, flag: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,32")
    if not values or min(values) < minimum:
        fail(f"{flag} {text!r}: expected integers >= {minimum}")
    return values


def float_list(text: str, flag: str, strict: bool = False) -> list[float]:
    """Comma-separated finite numbers >= 0 (> 0 with strict); anything else ends with one line naming flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.1,0.5,1.5")
    if not values or not all(math.isfinite(v) and (v > 0 if strict else v >= 0) for v in values):
        fail(f"{flag} {text!r}: expected numbers {'>' if strict else '>='} 0")
    return values


def positive(flag: str, value, minimum=1):
    if value < minimum:
        fail(f"{flag} must be >= {minimum}, got {value}")
    return value


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """Median and tail of per-iteration times, in ms."""
    ms = 1000 * np.asarray(seconds, dtype=np.float64)
    return {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)), "min": float(ms.min()), "n": int(ms.size)}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], fmt: str = ".2f", formats: dict | None = None) -> str:
    """formats overrides fmt for single columns, e.g. {"ratio": ".3f"}."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), formats.get(c, fmt)) for c in columns) + " |")
    return "\n".join(lines)


def table(rows: list[dict], columns: list[str], title: str | None = None, fmt: str = ".2f",
          formats: dict | None = None) -> dict:
    return {"title": title, "rows": rows, "columns": columns, "fmt": fmt, "formats": formats or {}}


def report(name: str, title: str, info: dict, tables: list[dict], notes: list[str], out_dir: str | None,
           extra: dict | None = None) -> None:
    """Print the tables (and notes) as Markdown; with out_dir also write <name>.md and <name>.json."""
    blocks = []
    for t in tables:
        if t["title"]:
            blocks += [f"**{t['title']}**", ""]
        blocks += [markdown_table(t["rows"], t["columns"], t["fmt"], t["formats"]), ""]
    text = "\n".join([f"### {title}", "", *machine_lines(info), "", *blocks, *(f"- {n}" for n in notes)])
    text = text.rstrip() + "\n"
    print(text, flush=True)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text)
        payload = {"title": title, "machine": info, "command": command_line(),
                   "tables": [{k: t[k] for k in ("title", "columns", "rows")} for t in tables],
                   "notes": notes, **(extra or {})}
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {out / (name + '.md')} and {out / (name + '.json')}")


def timed(step, batches: list[dict], n: int, device: torch.device) -> list[float]:
    """Seconds per call of n calls cycling through batches; the device is synced before each reading."""
    seconds = []
    for k in range(n):
        start = time.perf_counter()
        step(batches[k % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def alternate_rounds(steps: dict, batches: list, warmup: int, rounds: int, n: int, device: torch.device):
    """Time two (or more) step functions in alternating rounds, the order reversed every round.

    Machine-speed drifts then hit every method alike. Returns per-step seconds and per-round
    medians (ms), both keyed by method name.
    """
    for step in steps.values():
        timed(step, batches, warmup, device)
    seconds = {name: [] for name in steps}
    round_medians = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = timed(steps[name], batches, n, device)
            seconds[name] += t
            round_medians[name].append(1000 * float(np.median(t)))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in round_medians.items()),
              flush=True)
    return seconds, round_medians


def loop_update(train_step, model, optimizer, accelerator, args, batch_size_of, scheduler=None, ema=None,
                check: str = "update"):
    """One call = one optimizer update as a ``train_*.py`` loop runs it, minus its every-N logging, evaluation
    and checkpointing: the script's own ``train_step``, the ``TrainMeter`` sums, the finite check, the
    scheduler and the EMA. ``model`` and ``optimizer`` must be prepared, with ``gradient_accumulation_steps=1``.

    ``check="update"`` is the loops' check (``torch.isfinite`` of the clipped gradient norm once per update);
    ``"micro_batch"`` is the check the loops used before (an all-reduce of a finite-loss flag and a host sync
    every micro-batch), kept so both costs can be measured side by side.
    """
    from training.summary import TrainMeter

    if check not in ("update", "micro_batch"):
        raise ValueError(f"check must be 'update' or 'micro_batch', got {check!r}")
    meter = TrainMeter(accelerator, logging.getLogger("benchmark"))
    state = {"global_step": 0}

    def step(batch: dict) -> None:
        loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
        meter.add(loss, parts, batch_size_of(batch))
        if check == "micro_batch" and accelerator.reduce(torch.isfinite(loss).logical_not().float(), "sum").item():
            raise RuntimeError(f"non-finite loss at update {state['global_step'] + 1}")
        if not accelerator.sync_gradients:
            return
        if check == "update" and not bool(torch.isfinite(grad_norm)):
            raise RuntimeError(f"non-finite loss at update {state['global_step'] + 1}")
        if scheduler is not None and not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state["global_step"] += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=state["global_step"])

    return step


def step_overhead_report(name: str, script: str, steps: dict, batches: list, flags, batch_size: int,
                         device: torch.device, model_note: str, unit: str = "samples") -> float:
    """Time ``steps`` (from ``step_methods``: "ours", optionally the previous loop, "bare") in alternating rounds and
    report ms per update, throughput and the ratio to "bare"; returns ours/bare (median of all timed steps)."""
    info = print_header(f"Training step: {script} vs bare PyTorch")
    seconds, round_medians = alternate_rounds(steps, batches, flags.warmup, flags.rounds, flags.steps, device)
    summary = {method: stats_ms(s) for method, s in seconds.items()}
    bare = summary["bare"]["median"]
    ratio = summary["ours"]["median"] / bare
    paired = [o / b for o, b in zip(round_medians["ours"], round_medians["bare"])]
    labels = {"ours": f"ours ({script} train_step + loop)", "bare": "bare PyTorch"}
    throughput = f"{unit}_per_s"
    rows = [{"method": labels.get(method, method), "ms_per_step_median": s["median"], "ms_p10": s["p10"],
             "ms_p90": s["p90"], throughput: 1000 * batch_size / s["median"], "steps_timed": s["n"],
             "ratio_vs_bare": s["median"] / bare} for method, s in summary.items()]
    columns = ["method", "ms_per_step_median", "ms_p10", "ms_p90", throughput, "steps_timed", "ratio_vs_bare"]
    notes = [
        model_note,
        f"ours/bare = {ratio:.3f} (median of all timed steps): {'meets' if ratio <= TARGET_RATIO else 'MISSES'} "
        f"the target <= {TARGET_RATIO}. Per-round ratios: {', '.join(f'{q:.3f}' for q in paired)}.",
        f"{flags.rounds} rounds x {flags.steps} updates per method after {flags.warmup} warm-up updates; "
        f"{flags.distinct_batches} pre-made batches cycled (data loading excluded).",
    ]
    report(name, "Training step overhead (ms per update)", info,
           [table(rows, columns, formats={"ratio_vs_bare": ".3f", throughput: ".1f"})], notes, flags.out,
           extra={"round_medians_ms": round_medians, "ratio": ratio, "paired_round_ratios": paired,
                  "median_ratio_of_rounds": float(np.median(paired))})
    return ratio


def add_step_flags(p) -> None:
    """The timing flags every *_step.py benchmark shares."""
    p.add_argument("--steps", type=int, default=20, help="timed updates per method per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per method before the first round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the order flips every round")
    p.add_argument("--distinct_batches", type=int, default=4, help="pre-made batches, cycled")
    p.add_argument("--previous_check", action="store_true",
                   help="also time the loop with the previous per-micro-batch all-reduce finite check")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="folder for the .md/.json report")


def check_step_flags(flags) -> None:
    for name in ("steps", "rounds", "distinct_batches"):
        positive(f"--{name}", getattr(flags, name))
    positive("--warmup", flags.warmup, 0)
    if flags.threads:
        torch.set_num_threads(positive("--threads", flags.threads))


def bare_update(model, args, device: torch.device, forward, loss_of):
    """The reference update in plain PyTorch on the same model: no Accelerate, scheduler, EMA or host sync.
    ``forward(model, batch)`` runs under bf16 autocast when ``args.mixed_precision`` is bf16;
    ``loss_of(outputs, batch) -> (loss, parts)`` outside it, as the scripts' losses do."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    bf16 = args.mixed_precision == "bf16"

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(model, batch)
        loss, _ = loss_of(outputs, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_methods(make_ours, make_bare, base, previous_check: bool) -> dict:
    """{"ours": ..., ["ours, micro-batch finite check (previous loop)": ...,] "bare": ...}, each on its own deep
    copy of ``base`` so that all start from the same weights. ``make_ours(model, check)``, ``make_bare(model)``."""
    import copy

    steps = {"ours": make_ours(copy.deepcopy(base), "update")}
    if previous_check:
        steps["ours, micro-batch finite check (previous loop)"] = make_ours(copy.deepcopy(base), "micro_batch")
    steps["bare"] = make_bare(copy.deepcopy(base))
    return steps


def preset_args(flags, args_cls, overrides: tuple[str, ...], **fixed):
    """A training script's Args from ``flags.config`` (a preset path, found in the repo when run from outside
    it; "none" for the script's defaults), the benchmark flags named in ``overrides`` when given, then the
    values every step benchmark fixes (one update per micro-batch, no workers, no tracker) and ``fixed``.
    A bad preset or value ends the program with one line."""
    root = Path(__file__).resolve().parents[1]
    config = None if str(flags.config).lower() == "none" else flags.config
    if config and not Path(config).exists() and (root / config).exists():
        config = str(root / config)  # the default preset, also when run from outside the repo
    try:
        values = load_yaml_config(config, args_cls) if config else {}
        values.update({name: getattr(flags, name) for name in overrides if getattr(flags, name) is not None})
        values.update(config=flags.config if config else None, cpu=flags.cpu or not torch.cuda.is_available(),
                      grad_accum=1, num_workers=0, report_to="none", **fixed)
        return args_cls(**values)
    except UsageError as e:
        fail(str(e))
