"""Shared plumbing of the benchmark scripts: the machine, the command line, timing
statistics and the Markdown/JSON report. Nothing here measures anything by itself.

Every benchmark prints the machine and its exact command line before it starts and a
Markdown table at the end, and with ``--out DIR`` also writes ``DIR/<name>.md`` and
``DIR/<name>.json``, so README tables can be copied from a file that says where they
came from.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.config import fail


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
