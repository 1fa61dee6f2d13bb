"""The runs tool: many runs of one train script, for any task.

    python -m training.runs compare 'runs/pair/lr*' [--metrics M1,M2] [--sort METRIC] [--csv] [--plot curves.png]
    python -m training.runs seeds --seeds 42,2023,2024 [--name NAME] -- \\
        accelerate launch [launch flags] train_pair.py --config configs/pair_fusion.yaml [script flags]
    python -m training.runs search --trials 20 --space "lr=1e-4:1e-2:log,width_mult=0.25|0.5|1.0" \\
        --metric val/accuracy --mode max [--study NAME] [--storage URL] -- accelerate launch train_pair.py ...

It reads and launches run directories (``args.yaml``, ``env.yaml``, ``summary.csv``, ``train.log``,
``best/`` and ``final/metrics.json``), never imports a train script and needs no network. docs/runs.md
documents all three commands.

``compare`` prints one row per run: name, task, git commit, state, updates, wall time (train.log's
timestamps, summed per launch), the monitored metric (value of the best and of the final export, best
step), the ``--metrics`` (best and final), and the arguments that differ between runs of the same task.
``--plot`` draws the curves against step (summary.csv's evaluations, train.log's train/loss) with the best
step marked; train losses are smoothed with W&B's EMA formula.

``seeds`` launches the command once per seed, one launch after the other, with
``--seed S --run_name <name>_s<S>`` appended (the scripts put runs named ``<name>_s<S>``
in one W&B group ``<name>``). ``<name>`` is ``--name``, else the command's own
``--run_name`` (taken out of the command). Each seed's run directory is
``<output_dir>/<name>_s<S>``; ``output_dir`` is the command's ``--output_dir``, else the
``output_dir`` key of its ``--config`` YAML, else ``runs/<task>`` (``train_<task>.py``).

Running the same command again continues where it stopped: a seed whose run has a
``final/`` export is skipped, a seed whose run directory exists without one is launched
again with ``--resume auto`` (its newest complete checkpoint), the others start fresh.
A launch that fails stops the tool with the launch's exit status.

At the end it prints mean +- sample std (ddof=1) over the seeds of every numeric metric
that all runs have (``best/metrics.json``, else ``final/metrics.json``, plus the run's
``results.json`` where the script writes one) and writes ``<output_dir>/<name>_seeds.json``
with ``runs``, ``seeds``, ``mean`` and ``std``.

``search`` is an Optuna study (TPE sampler, median pruner) stored in ``<output_dir>/<study>.journal``
(or an RDB ``--storage`` URL shared by several machines). Each trial is one launch with the sampled values
as flags and ``--run_name <study>_t<number>``; the pruner reads the trial's summary.csv while it runs and
a pruned launch is stopped with SIGTERM (a ``PRUNED`` file in its run directory says so); the objective
is ``--metric`` in the trial's ``best/metrics.json``. The same command continues a stopped search: a trial
left running by a killed search is marked failed and its values run again, resuming its run directory.
``--max_failures`` failed trials in a row stop the search (exit 1), a launch refused before it made its run
directory at once (exit 2); a new study never reuses run directories named like its trials.

Mistakes in the tool's flags or in the command (a bad seed list or search space, no command, no
``train_*.py`` in it, a flag the tool sets itself, a folder that is no run, a metric the runs do not log)
end with one line and exit status 2 before anything is launched (a search's metric is checked at the first
evaluation of its trials until one has reported it; that trial and a new study are then removed).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.config import fail

PROG = "python -m training.runs"

# Flags of the train scripts that the tool reads or sets itself; written in full in the command.
READ_FLAGS = ("config", "output_dir", "run_name", "resume", "seed", "seeds")


def stop(message: str, status: int) -> None:
    """One ``prog: error: ...`` line and exit ``status`` (a launch's own status, not a usage error)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


# ----------------------------------------------------------------------------- the training command

@dataclass
class TrainCommand:
    """A launch command (``accelerate launch ... train_<task>.py [script flags]``) as the tool sees it."""
    argv: list[str]
    script_index: int          # argv[script_index] is the train script; its flags follow it

    @property
    def script(self) -> Path:
        return Path(self.argv[self.script_index])

    @property
    def task(self) -> str:
        return self.script.stem.removeprefix("train_")

    @property
    def script_args(self) -> list[str]:
        return self.argv[self.script_index + 1:]

    def flag(self, name: str) -> str | None:
        """The value of ``--name V`` / ``--name=V`` among the script flags (the last one wins, as in argparse)."""
        value = None
        args = self.script_args
        for i, arg in enumerate(args):
            if arg == f"--{name}":
                value = args[i + 1] if i + 1 < len(args) else ""
            elif arg.startswith(f"--{name}="):
                value = arg.split("=", 1)[1]
        return value

    def has_flag(self, name: str) -> bool:
        return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in self.script_args)

    def without_flag(self, name: str) -> TrainCommand:
        """The command with every ``--name V`` / ``--name=V`` script flag taken out."""
        args, out, i = self.script_args, [], 0
        while i < len(args):
            if args[i] == f"--{name}":
                i += 2
                continue
            if not args[i].startswith(f"--{name}="):
                out.append(args[i])
            i += 1
        return TrainCommand(self.argv[:self.script_index + 1] + out, self.script_index)

    def with_args(self, *extra: str) -> list[str]:
        return [*self.argv, *extra]

    def output_dir(self) -> Path:
        """``--output_dir``, else the ``output_dir`` key of the ``--config`` YAML, else ``runs/<task>``."""
        value = self.flag("output_dir")
        if value:
            return Path(value)
        config = self.flag("config")
        if config and config.lower() not in ("none", "null"):
            path = Path(config)
            if not path.is_file():
                fail(f"--config {config} in the command: file not found (the tool reads its output_dir)")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                fail(f"--config {config} in the command: not valid YAML ({str(e).splitlines()[0]})")
            if not isinstance(raw, dict):
                fail(f"--config {config} in the command: expected a mapping of flag names to values")
            value = raw.get("output_dir")
            if value is not None:
                if not isinstance(value, str) or not value:
                    fail(f"--config {config}: key output_dir: expected a folder name, got {value!r}")
                return Path(value)
        return Path("runs") / self.task


def parse_command(argv: list[str] | None) -> TrainCommand:
    """Find the train script in the command after ``--``; exit 2 when there is none."""
    if not argv:
        fail("no command after --; give the training command, e.g. "
             "-- accelerate launch train_pair.py --config configs/pair_fusion.yaml")
    named = [i for i, a in enumerate(argv) if fnmatch.fnmatch(Path(a).name, "train_*.py")]
    found = [i for i in named if Path(argv[i]).is_file()]
    if not found:
        if named:
            fail(f"{argv[named[0]]} in the command: file not found (relative paths are taken from {Path.cwd()})")
        fail(f"the command is not a train script launch (no train_<task>.py in it): {shlex.join(argv)}")
    if shutil.which(argv[0]) is None:
        fail(f"{argv[0]}: command not found (the first word of the command after --)")
    command = TrainCommand(list(argv), found[0])
    for arg in command.script_args:
        given = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        # argparse takes a unique prefix for the full flag; the tool would miss it
        abbreviated = [f for f in READ_FLAGS if given and given not in READ_FLAGS and f.startswith(given)]
        if abbreviated:
            fail(f"--{given} in the command: write --{abbreviated[0]} in full (the runs tool reads it)")
    for name in ("output_dir", "config", "run_name"):
        if command.has_flag(name) and not command.flag(name):
            fail(f"--{name} in the command has no value")
    return command


# ----------------------------------------------------------------------------- run directories

def read_run_metrics(run_dir: Path) -> dict[str, float] | None:
    """Numeric values of ``best/metrics.json`` (else ``final/``) and of ``results.json``; None without either export."""
    metrics = {}
    for name in ("best/metrics.json", "final/metrics.json"):
        if (run_dir / name).is_file():
            metrics = _numeric(_read_json(run_dir / name))
            break
    else:
        return None
    if (run_dir / "results.json").is_file():
        metrics.update(_numeric(_read_json(run_dir / "results.json")))
    metrics.pop("seed", None)  # the varied quantity, not a result
    return metrics


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path}: not readable JSON ({e})")


def _numeric(record) -> dict[str, float]:
    if not isinstance(record, dict):
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def write_json_atomic(path: Path, record: dict) -> None:
    """Write a temporary file in the same folder, then rename it over ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def launch(cmd: list[str], what: str, run_dir: Path) -> None:
    """Run one launch in the foreground; a failure ends the tool with the launch's exit status."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        status = subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        stop(f"interrupted during {what} (run directory {run_dir}); run the same command again to continue", 130)
    if status != 0:
        status = 128 - status if status < 0 else status  # killed by a signal: the shell's convention
        stop(f"{what} failed with exit status {status} (run directory {run_dir}); "
             "fix the cause and run the same command again to continue", status)


# ----------------------------------------------------------------------------- seeds

def parse_seeds(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        fail(f"--seeds expects comma-separated integers such as 42,2023,2024; got {text!r}")
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        fail(f"--seeds expects comma-separated integers such as 42,2023,2024; got {text!r}")
    if any(s < 0 for s in seeds):
        fail(f"--seeds must be non-negative integers; got {text!r}")
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        fail(f"--seeds has duplicates ({', '.join(map(str, duplicates))}): {text!r}")
    return seeds


def add_seeds_parser(sub) -> None:
    p = sub.add_parser(
        "seeds", help="one launch per seed (resumable), then mean +- std of the metrics over the seeds",
        description="Launch the training command once per seed (appending --seed S --run_name <name>_s<S>), "
                    "skip finished seeds, resume unfinished ones, then print mean +- std over the seeds and write "
                    "<output_dir>/<name>_seeds.json.",
        usage=f"{PROG} seeds --seeds S1,S2,... [--name NAME] -- COMMAND ...",
        epilog="COMMAND: the launch of one train script, e.g. accelerate launch train_pair.py --config "
               "configs/pair_fusion.yaml. Leave out --seed and --run_name: the tool appends them.")
    p.add_argument("--seeds", required=True, metavar="S1,S2,...",
                   help="comma-separated non-negative integer seeds, one launch each, in this order")
    p.add_argument("--name", default=None,
                   help="group name: runs are <output_dir>/<name>_s<seed> (default: the command's --run_name)")
    p.set_defaults(func=cmd_seeds, takes_command=True)


def cmd_seeds(args, command_argv: list[str] | None) -> int:
    seeds = parse_seeds(args.seeds)
    command = parse_command(command_argv)
    for name, why in (("seed", "the tool appends --seed S for each seed of --seeds"),
                      ("seeds", "each launch trains one seed; give all of them to the tool's --seeds")):
        if command.has_flag(name):
            fail(f"--{name} {command.flag(name)} in the command: {why}; leave it out")
    resume = command.flag("resume")
    if resume is not None and resume != "auto":
        fail(f"--resume {resume} in the command: the tool resumes each unfinished seed from its own run "
             "directory (--resume auto); leave it out")
    command = command.without_flag("resume")

    run_name = command.flag("run_name")
    if args.name is not None and run_name is not None and args.name != run_name:
        fail(f"--name {args.name} and --run_name {run_name} in the command disagree; give the name once")
    name = args.name if args.name is not None else run_name
    if name is None:
        fail("no name for the runs: give --name NAME (runs are <output_dir>/<NAME>_s<seed>) "
             "or --run_name in the command")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        fail(f"--name {name!r}: expected a plain folder name (no '/')")
    command = command.without_flag("run_name")
    output_dir = command.output_dir()

    run_dirs = [output_dir / f"{name}_s{seed}" for seed in seeds]
    print(f"{len(seeds)} seed(s) of {command.script} as {output_dir / name}_s<seed>", flush=True)
    for seed, run_dir in zip(seeds, run_dirs):
        if (run_dir / "final" / "metrics.json").is_file():
            print(f"seed {seed}: finished ({run_dir / 'final'} exists), skipped", flush=True)
            continue
        extra = ["--seed", str(seed), "--run_name", run_dir.name]
        if run_dir.exists():
            print(f"seed {seed}: unfinished run {run_dir}, resuming it (--resume auto)", flush=True)
            extra += ["--resume", "auto"]
        else:
            print(f"seed {seed}: launching {run_dir}", flush=True)
        launch(command.with_args(*extra), f"seed {seed}", run_dir)

    metrics = []
    for seed, run_dir in zip(seeds, run_dirs):
        record = read_run_metrics(run_dir)
        if record is None:
            stop(f"seed {seed}: {run_dir} has neither best/metrics.json nor final/metrics.json after its launch", 1)
        metrics.append(record)
    keys = [k for k in metrics[0] if all(k in m for m in metrics[1:])]
    dropped = sorted({k for m in metrics for k in m} - set(keys))
    if dropped:
        print(f"warning: left out of the summary, missing in some seeds' runs: {', '.join(dropped)}", flush=True)
    summary = {k: mean_std([m[k] for m in metrics]) for k in keys}
    print_seed_table(seeds, metrics, summary)
    path = output_dir / f"{name}_seeds.json"
    write_json_atomic(path, {"runs": [str(d) for d in run_dirs], "seeds": seeds,
                             "mean": {k: m for k, (m, _) in summary.items()},
                             "std": {k: s for k, (_, s) in summary.items()}})
    print(f"seed summary: {path}")
    return 0


def print_seed_table(seeds: list[int], metrics: list[dict], summary: dict[str, tuple[float, float]]) -> None:
    width = max([len("metric"), *map(len, summary)])
    print(f"\n{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), mean +- std (ddof=1):")
    print(f"  {'metric':<{width}}  {'mean':>12} +- {'std':<10}" + "".join(f"  {'s' + str(s):>12}" for s in seeds))
    for key, (mean, std) in summary.items():
        cells = "".join(f"  {m[key]:12.4f}" for m in metrics)
        print(f"  {key:<{width}}  {mean:12.4f} +- {std:<10.4f}{cells}")


# ----------------------------------------------------------------------------- reading a run directory

# task -> (the monitored metric as a function of the run's args, mode): what each train script passes to
# ``Checkpointer(monitor=..., mode=...)``. A checkpoint's meta.json also names the monitor (not the mode);
# it wins when present, so a script that changes its monitor is still read right.
MONITOR = {
    "captcha": (lambda a: "val_ema/hit_le_5px" if (a.get("ema_decay") or 0) > 0 else "val/hit_le_5px", "max"),
    "pair": (lambda a: "val/accuracy", "max"),
    "smlm": (lambda a: f"val/{a.get('select_metric') or 'effcy_lat'}", "max"),
    "smlm_colour": (lambda a: f"val/{a.get('select_metric') or 'effcy_lat'}", "max"),
    "vqa": (lambda a: "val/accuracy", "max"),
    "anomaly": (lambda a: "val/aupro", "max"),
}
# One line of TrainMeter.write in train.log: "HH:MM:SS INFO update N  loss X  lr X  grad X  X samples/s  data X%"
LOG_UPDATE = re.compile(r"^\d\d:\d\d:\d\d INFO update (\d+)  loss (\S+)  lr \S+  grad (\S+)  (\S+) samples/s")
LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d) ")
LOG_START = re.compile(r"INFO run .*: \d+ process\(es\)")  # start_run's first line: one per launch
MARKERS = ("PRUNED", "INTERRUPTED", "FAILED")  # written by ``search`` into a trial's run directory


@dataclass
class RunInfo:
    """What ``compare`` and ``search`` read of one run directory (read only, never written)."""
    path: Path
    task: str
    args: dict
    env: dict
    series: dict[str, list[tuple[int, float]]]   # metric -> (step, value), from summary.csv and train.log
    best: dict | None                            # best/metrics.json
    final: dict | None                           # final/metrics.json
    monitor: str | None
    mode: str | None
    wall_s: float | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        for marker in MARKERS:
            if (self.path / marker).is_file():
                return marker.lower()
        return "finished" if self.final is not None else "unfinished"

    @property
    def updates(self) -> int | None:
        if self.final is not None and "global_step" in self.final:
            return int(self.final["global_step"])
        steps = [s for points in self.series.values() for s, _ in points]
        return max(steps, default=None)

    def metrics(self) -> set[str]:
        return set(self.series) | set(_numeric(self.best or {})) | set(_numeric(self.final or {}))

    def best_value(self, metric: str) -> float | None:
        """``metric`` of the best export (the model the monitor picked), else its last logged value at or
        before the best step (metrics the export does not hold, such as train/loss, or no export yet)."""
        value = _numeric(self.best or {}).get(metric)
        step = self.best_step
        if value is None and step is not None:
            before = [v for s, v in self.series.get(metric, []) if s <= step]
            value = before[-1] if before else None
        return value

    def final_value(self, metric: str) -> float | None:
        """``metric`` of the final export, else its last logged value."""
        value = _numeric(self.final or {}).get(metric)
        if value is None:
            points = self.series.get(metric)
            value = points[-1][1] if points else None
        return value

    @property
    def best_step(self) -> int | None:
        if self.best is not None and "global_step" in self.best:
            return int(self.best["global_step"])
        points = [(s, v) for s, v in self.series.get(self.monitor or "", []) if math.isfinite(v)]
        if not points:
            return None
        pick = max if self.mode != "min" else min
        return pick(points, key=lambda sv: sv[1])[0]


def is_run_dir(path: Path) -> bool:
    return (path / "args.yaml").is_file() and (path / "env.yaml").is_file()


def load_run(path: Path) -> RunInfo:
    """Read a run directory; one line and exit 2 when it is not one."""
    if not path.is_dir():
        fail(f"{path}: no such run directory")
    if not is_run_dir(path):
        fail(f"{path}: not a run directory (expected args.yaml and env.yaml, as train_<task>.py writes them)")
    args, env = (_read_yaml(path / name) for name in ("args.yaml", "env.yaml"))
    task = str(env.get("task") or "?")
    series = read_summary(path / "summary.csv")
    for key, points in read_train_log(path / "train.log").items():
        series.setdefault(key, points)
    best, final = (_read_json(path / d / "metrics.json") if (path / d / "metrics.json").is_file() else None
                   for d in ("best", "final"))
    monitor, mode = None, None
    if task in MONITOR:
        monitor, mode = MONITOR[task][0](args), MONITOR[task][1]
    for meta in sorted(path.glob("checkpoints/step_*/meta.json"), reverse=True):
        monitor = (_read_json(meta) or {}).get("monitor") or monitor
        break
    return RunInfo(path, task, args, env, series, best, final, monitor, mode, wall_time(path / "train.log"))


def _read_yaml(path: Path) -> dict:
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: not readable YAML ({str(e).splitlines()[0]})")
    if not isinstance(record, dict):
        fail(f"{path}: expected a mapping")
    return record


def read_summary(path: Path) -> dict[str, list[tuple[int, float]]]:
    """summary.csv as metric -> [(step, value)], sorted by step; a step logged twice (a run resumed from an
    earlier checkpoint repeats the evaluations after it) keeps its last row; empty cells are left out."""
    if not path.is_file():
        return {}
    by_step: dict[int, dict] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    by_step[int(float(row.get("step") or ""))] = row
                except ValueError:
                    continue  # a row being written right now
    except OSError:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, text in by_step[step].items():
            if key in ("step", "epoch") or key is None or text in (None, ""):
                continue
            try:
                series.setdefault(key, []).append((step, float(text)))
            except ValueError:
                pass
    return series


def read_train_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/loss``, ``train/grad_norm`` and ``perf/samples_per_s`` from train.log's update lines (summary.csv
    holds evaluations only); the last line of a step wins, as in ``read_summary``."""
    found: dict[str, dict[int, float]] = {"train/loss": {}, "train/grad_norm": {}, "perf/samples_per_s": {}}
    if not path.is_file():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_UPDATE.match(line)
        if m:
            step = int(m.group(1))
            for key, text in zip(found, m.groups()[1:]):
                try:
                    found[key][step] = float(text)
                except ValueError:
                    pass
    return {k: sorted(v.items()) for k, v in found.items() if v}


def wall_time(path: Path) -> float | None:
    """Seconds of training in train.log: the time from the first to the last line of each launch, summed over
    launches (a resumed run's pause is not counted, nor the start-up before a launch's first line). Lines carry only
    HH:MM:SS, so a gap is taken modulo a day."""
    if not path.is_file():
        return None
    total, last = 0.0, None
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
        if last is not None and not LOG_START.search(line):
            total += (t - last) % 86400
        last = t
    return total if last is not None else None


def expand_runs(patterns: list[str]) -> list[RunInfo]:
    """Run directories named or matched by glob patterns, in the order given (a glob's matches sorted); a glob
    skips what is not a run (seed summaries, study files), a named folder must be one."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = [Path(p) for p in sorted(glob.glob(pattern)) if is_run_dir(Path(p))]
            if not matched:
                fail(f"{pattern}: matches no run directory (folders with args.yaml and env.yaml)")
            paths += matched
        else:
            paths.append(Path(pattern))
    runs, seen = [], set()
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            runs.append(load_run(path))
    return runs


# ----------------------------------------------------------------------------- compare

def differing_args(runs: list[RunInfo]) -> list[tuple[str, str]]:
    """(task, arg) of every argument whose value differs between the runs of one task, in args.yaml order;
    left out: run_name (the row's name) and resume (how a launch continued, not what it trained)."""
    out = []
    for task in dict.fromkeys(r.task for r in runs):
        group = [r for r in runs if r.task == task]
        keys = list(dict.fromkeys(k for r in group for k in r.args))
        out += [(task, k) for k in keys if k not in ("run_name", "resume")
                and len({json.dumps(r.args.get(k, "<absent>"), sort_keys=True, default=str) for r in group}) > 1]
    return out


def fmt_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def parse_metric_list(text: str | None, flag: str) -> list[str]:
    if text is None:
        return []
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        fail(f"{flag} expects comma-separated metric names such as val/hit_le_5px,val/mae_px; got {text!r}")
    return list(dict.fromkeys(items))


def check_logged(runs: list[RunInfo], metrics: list[str], flag: str) -> None:
    logged = set().union(*(r.metrics() for r in runs))
    for metric in metrics:
        if metric not in logged:
            near = sorted(k for k in logged if k.split("/")[0] == metric.split("/")[0]) or sorted(logged)
            fail(f"{flag} {metric}: no run logs it (they log {', '.join(near[:12])}{', ...' if len(near) > 12 else ''})")


def compare_table(runs: list[RunInfo], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    diff = differing_args(runs)
    several_tasks = len({r.task for r in runs}) > 1
    header = ["run", "task", "commit", "state", "updates", "wall", "monitor", "best", "final", "best step"]
    for metric in metrics:
        header += [f"{metric} best", f"{metric} final"]
    header += [f"{task}:{key}" if several_tasks else key for task, key in diff]
    rows = []
    for r in runs:
        commit = str(r.env.get("git_commit") or "-")[:8] + ("+" if r.env.get("git_dirty") else "")
        monitor = r.monitor or "-"
        row = [r.name, r.task, commit, r.state, fmt_value(r.updates), fmt_seconds(r.wall_s),
               monitor if r.mode is None else f"{monitor} ({r.mode})",
               fmt_value(r.best_value(monitor)), fmt_value(r.final_value(monitor)), fmt_value(r.best_step)]
        for metric in metrics:
            row += [fmt_value(r.best_value(metric)), fmt_value(r.final_value(metric))]
        row += [fmt_value(r.args.get(key)) if r.task == task else "" for task, key in diff]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def ema_smooth(values: list[float], factor: float) -> list[float]:
    """W&B's "Exponential Moving Average" smoothing, the same formula as TensorBoard's: an EMA with weight
    ``factor`` on the past, divided by 1 - factor^n so the first points are not pulled toward zero."""
    out, last, weight = [], 0.0, 0.0
    for v in values:
        last = factor * last + (1 - factor) * v
        weight = factor * weight + (1 - factor)
        out.append(last / weight)
    return out


def plot_curves(runs: list[RunInfo], metrics: list[str], path: Path, smooth: float):
    """One panel per metric against step, one line per run (legend by run name), the best step marked; train/*
    losses smoothed with ``ema_smooth`` over the faint raw curve. Returns the figure (closed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        for i, r in enumerate(runs):
            points = r.series.get(metric)
            if not points:
                continue
            color = colors[i % len(colors)]
            steps, values = [s for s, _ in points], [v for _, v in points]
            if metric.startswith("train/") and "loss" in metric and smooth > 0:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8, label="_nolegend_")
                values = ema_smooth(values, smooth)
            ax.plot(steps, values, color=color, linewidth=1.4, label=r.name,
                    marker="o" if len(points) < 20 and not metric.startswith("train/") else None, markersize=3)
            best = r.best_step
            if best is not None and not metric.startswith(("train/", "perf/")) and best in dict(points):
                ax.plot([best], [dict(points)[best]], marker="*", markersize=13, color=color,
                        markeredgecolor="black", linestyle="none", label="_nolegend_")
        title = metric + (f" (EMA {smooth})" if metric.startswith("train/") and "loss" in metric and smooth > 0 else "")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (optimizer updates)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # one legend for the figure: every run, even one missing from the first panel
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle("* best step (the export the monitored metric picked)", fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * ((len(labels) - 1) // 4), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="table (and curves) of run directories of any task: the offline W&B run comparison",
        description="One row per run: name, task, git commit, state, updates, wall time (from train.log), the "
                    "monitored metric (best export, final export, best step), the --metrics, and the arguments "
                    "that differ between the runs (per task). Markdown by default.",
        usage=f"{PROG} compare RUN_OR_GLOB ... [--metrics M1,M2] [--sort METRIC[:asc|:desc]] [--csv] "
              "[--plot FILE.png] [--smooth F]")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_GLOB",
                   help="run directories or glob patterns (quote them), e.g. 'runs/pair/lr*'")
    p.add_argument("--metrics", default=None, metavar="M1,M2",
                   help="metric columns (value of the best export and of the final export) and plot panels")
    p.add_argument("--sort", default=None, metavar="METRIC[:asc|:desc]",
                   help="order rows by METRIC of the best export; default direction: the monitor's mode for the "
                        "monitored metric, else descending; runs without it last")
    p.add_argument("--csv", action="store_true", help="CSV instead of a Markdown table")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="curves against step: the monitored metric, then --metrics (default: train/loss)")
    p.add_argument("--smooth", type=float, default=0.6,
                   help="EMA factor for train/*loss curves, W&B's and TensorBoard's formula; 0 = raw (default 0.6)")
    p.set_defaults(func=cmd_compare, takes_command=False)


def cmd_compare(args, command_argv) -> int:
    metrics = parse_metric_list(args.metrics, "--metrics")
    if not 0 <= args.smooth < 1:
        fail(f"--smooth expects a factor in [0, 1); got {args.smooth}")
    sort_key, sort_dir = None, None
    if args.sort is not None:
        sort_key, _, sort_dir = args.sort.partition(":")
        if not sort_key or sort_dir not in ("", "asc", "desc"):
            fail(f"--sort expects METRIC, METRIC:asc or METRIC:desc; got {args.sort!r}")
    if args.plot is not None and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        fail(f"--plot {args.plot}: expected a .png, .pdf or .svg file name")
    runs = expand_runs(args.runs)
    check_logged(runs, metrics, "--metrics")
    if sort_key is not None:
        check_logged(runs, [sort_key], "--sort")
        if not sort_dir:
            modes = {r.mode for r in runs if r.monitor == sort_key}
            sort_dir = "asc" if modes == {"min"} else "desc"
        present = [r for r in runs if r.best_value(sort_key) is not None]
        present.sort(key=lambda r: r.best_value(sort_key), reverse=sort_dir == "desc")
        runs = present + [r for r in runs if r.best_value(sort_key) is None]
    header, rows = compare_table(runs, metrics)
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        print(markdown(header, rows))
    if args.plot is not None:
        monitors = list(dict.fromkeys(r.monitor for r in runs if r.monitor))
        panels = list(dict.fromkeys([*monitors, *(metrics or ["train/loss"])]))
        panels = [m for m in panels if any(m in r.series for r in runs)]
        if not panels:
            fail(f"--plot {args.plot}: the runs have no curves (summary.csv and train.log are empty or missing)")
        plot_curves(runs, panels, Path(args.plot), args.smooth)
        print(f"curves: {args.plot} ({', '.join(panels)})", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- search

POLL_S = 1.0           # seconds between reads of a running trial's summary.csv
STOP_GRACE_S = 60.0    # seconds a stopped trial gets to exit after SIGTERM before SIGKILL
# Flags the tool sets for each trial, or that make no sense to search.
SEARCH_OWN_FLAGS = ("output_dir", "run_name", "resume", "seeds", "config")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Param:
    """One entry of --space: ``name=lo:hi`` (float), ``lo:hi:log``, ``lo:hi:int`` or ``a|b|c`` (choices)."""
    name: str
    kind: str                  # "float", "log", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")


def parse_space(text: str) -> list[Param]:
    """``lr=1e-4:1e-2:log,weight_decay=1e-5:1e-2:log,width_mult=0.25|0.5|1.0``; a choice may hold commas
    (``layers=1,1,1|2,2,2``): an entry starts only where ``,name=`` does."""
    example = "e.g. lr=1e-4:1e-2:log,dropout=0:0.5,feat_dim=64|128"
    if not text.strip():
        fail(f"--space is empty; {example}")
    params: list[Param] = []
    for entry in re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", text):
        name, eq, spec = entry.partition("=")
        name, spec = name.strip(), spec.strip()
        if not eq or not NAME.match(name):
            fail(f"--space entry {entry!r}: expected NAME=LOW:HIGH[:log|:int] or NAME=A|B|...; {example}")
        if name in SEARCH_OWN_FLAGS:
            fail(f"--space {name}: the tool sets --{name} itself (or it cannot vary within a study)")
        if any(p.name == name for p in params):
            fail(f"--space names {name} twice")
        if "|" in spec:
            choices = tuple(c.strip() for c in spec.split("|"))
            if any(not c for c in choices) or len(set(choices)) != len(choices):
                fail(f"--space {name}={spec}: choices must be distinct and non-empty")
            params.append(Param(name, "choice", choices=choices))
            continue
        parts = spec.split(":")
        kind = parts[2] if len(parts) == 3 else "float"
        if len(parts) not in (2, 3) or kind not in ("float", "log", "int"):
            fail(f"--space {name}={spec}: expected LOW:HIGH, LOW:HIGH:log, LOW:HIGH:int or A|B|...; {example}")
        try:
            low, high = (int(p) if kind == "int" else float(p) for p in parts[:2])
        except ValueError:
            fail(f"--space {name}={spec}: LOW and HIGH must be {'integers' if kind == 'int' else 'numbers'}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            fail(f"--space {name}={spec}: expected finite LOW < HIGH")
        if kind == "log" and low <= 0:
            fail(f"--space {name}={spec}: a log range needs LOW > 0")
        params.append(Param(name, kind, low, high))
    return params


def flag_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _alive(pid, needle: str) -> bool:
    """Whether process ``pid`` runs and its command line holds ``needle`` (guards against a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return needle in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid


def stop_launch(proc: subprocess.Popen) -> None:
    """SIGTERM to the launch's process group (launcher and training processes), SIGKILL after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def write_marker(run_dir: Path, name: str, text: str) -> None:
    if run_dir.is_dir():
        for old in MARKERS:
            (run_dir / old).unlink(missing_ok=True)
        (run_dir / name).write_text(text.rstrip() + "\n")


class MetricNotLogged(Exception):
    pass


def summary_columns(path: Path) -> list[str] | None:
    """The header of summary.csv once the file holds a first row (None before)."""
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header, first = next(reader, None), next(reader, None)
    except OSError:
        return None
    return header if header and first else None


def run_trial(study, trial, command: TrainCommand, output_dir: Path, params: dict, run_dir: Path, metric: str,
              retry: bool, check_metric: bool):
    """Launch one trial, feed its summary.csv to the pruner while it runs; -> (state, value, exit status).
    ``check_metric``: raise MetricNotLogged when the first evaluation's columns lack ``metric``."""
    from optuna.trial import TrialState

    extra = ["--output_dir", str(output_dir), "--run_name", run_dir.name]
    for name, value in params.items():
        extra += [f"--{name}", flag_value(value)]
    if retry and run_dir.exists():
        extra += ["--resume", "auto"]  # a retry of an interrupted trial continues its checkpoints
    cmd = command.with_args(*extra)
    trial.set_user_attr("command", shlex.join(cmd))
    print(f"\ntrial {trial.number}: {' '.join(f'{k}={flag_value(v)}' for k, v in params.items())}\n"
          f"$ {shlex.join(cmd)}", flush=True)
    for old in MARKERS:
        (run_dir / old).unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, process_group=0)  # its own group: a prune stops it and nothing else
    trial.set_user_attr("launch_pid", proc.pid)
    reported: set[int] = set()
    try:
        while True:
            finished = proc.poll() is not None
            summary = run_dir / "summary.csv"
            if check_metric:
                columns = summary_columns(summary)
                if columns is not None:
                    if metric not in columns:
                        stop_launch(proc)
                        raise MetricNotLogged([c for c in columns if c not in ("step", "epoch")])
                    check_metric = False
            series = read_summary(summary)
            for step, value in series.get(metric, []):
                if step in reported or not math.isfinite(value):
                    continue
                reported.add(step)
                trial.report(value, step)
                if trial.should_prune():
                    stop_launch(proc)
                    write_marker(run_dir, "PRUNED", f"pruned by {PROG} search: study {study.study_name}, trial "
                                 f"{trial.number}, at step {step} ({metric} {value:.6g} worse than the median of "
                                 "earlier trials at that step)")
                    print(f"trial {trial.number}: pruned at step {step} ({metric} {value:.6g})", flush=True)
                    return TrialState.PRUNED, None, None
            if finished:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        stop_launch(proc)
        raise
    status = proc.returncode
    if status != 0:
        status = 128 - status if status < 0 else status
        write_marker(run_dir, "FAILED", f"trial {trial.number} of study {study.study_name}: the launch exited "
                     f"with status {status}")
        return TrialState.FAIL, None, status
    best = run_dir / "best" / "metrics.json"  # the model the script's own monitor picked
    value = _numeric(_read_json(best)).get(metric) if best.is_file() else None
    if value is None or not math.isfinite(value):
        write_marker(run_dir, "FAILED", f"trial {trial.number} of study {study.study_name}: no finite {metric} "
                     "in best/metrics.json")
        return TrialState.FAIL, None, 0
    return TrialState.COMPLETE, value, 0


def recover_interrupted(study, host: str) -> None:
    """Trials this host left RUNNING (the search was killed): stop a launch still running, mark the trial FAIL and
    enqueue its parameters again, with its run directory, so the next trial resumes it (counted once)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") != host or _alive(attrs.get("tool_pid"), "training.runs"):
            continue  # another machine's trial, or a search still running here
        if "run_dir" not in attrs:  # killed between ask() and its first note: nothing was launched
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            continue
        run_dir = Path(attrs["run_dir"])
        pid = attrs.get("launch_pid")
        if _alive(pid, run_dir.name or "train_"):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            for _ in range(int(STOP_GRACE_S * 10)):
                if not _alive(pid, run_dir.name):
                    break
                time.sleep(0.1)
        study.tell(t.number, state=TrialState.FAIL)
        write_marker(run_dir, "INTERRUPTED", f"trial {t.number} of study {study.study_name} was interrupted "
                     "(its search stopped); a later trial resumes this run directory")
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "run_dir": str(run_dir)})
        print(f"trial {t.number}: interrupted by a stopped search; it is run again (resuming {run_dir})", flush=True)


def refuse_leftover_trials(output_dir: Path, study: str, where) -> None:
    """A new study must not meet run directories of an earlier study of the same name (its journal deleted,
    say): a trial would resume, or remove, a run it did not make."""
    pattern = re.compile(rf"^{re.escape(study)}_t\d+$")
    found = sorted(p.name for p in output_dir.glob(f"{study}_t*") if pattern.match(p.name)) \
        if output_dir.is_dir() else []
    if found:
        fail(f"--study {study}: {where} holds no such study but {output_dir} has its trials' run directories "
             f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); move them away or pick another --study")


def trials_table(study, space: list[Param], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["trial", *[p.name for p in space], metric, "state", "run", "note"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        notes = [f"retry of {t.user_attrs['retry_of']}"] if "retry_of" in t.user_attrs else []
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            notes.append(f"{fmt_value(t.intermediate_values[step])} at step {step}")
        note = "; ".join(notes)
        rows.append([str(t.number), *[fmt_value(t.params.get(p.name)) for p in space],
                     fmt_value(t.value if t.state.name == "COMPLETE" else None), t.state.name,
                     str(t.user_attrs.get("run_dir", "-")), note])
    return header, rows


def add_search_parser(sub) -> None:
    p = sub.add_parser(
        "search", help="hyperparameter search with Optuna (TPE, median pruning), one launch per trial, resumable",
        description="Launch the training command once per trial with the sampled values as flags "
                    "(--run_name <study>_t<number>); the objective is --metric in the trial's best/metrics.json. "
                    "The study lives in <output_dir>/<study>.journal (or --storage), so the same command continues "
                    "an interrupted search.",
        usage=f"{PROG} search --trials N --space SPACE --metric METRIC --mode {{min,max}} [--study NAME] "
              "[--storage URL] -- COMMAND ...",
        epilog="SPACE: comma-separated NAME=LOW:HIGH (uniform), NAME=LOW:HIGH:log, NAME=LOW:HIGH:int or "
               "NAME=A|B|C (choices, passed as written), e.g. lr=1e-4:1e-2:log,width_mult=0.25|0.5|1.0. "
               "COMMAND: the launch of one train script; leave out --run_name and the searched flags.")
    p.add_argument("--trials", type=int, required=True, help="trials in the study (finished, pruned or running)")
    p.add_argument("--space", required=True, help="the search space, see below")
    p.add_argument("--metric", required=True, help="objective: this key of each trial's best/metrics.json, "
                                                   "reported to the pruner from summary.csv")
    p.add_argument("--mode", required=True, choices=("min", "max"), help="minimise or maximise --metric")
    p.add_argument("--study", default="search", help="study name; trials run in <output_dir>/<study>_t<number> "
                                                     "(default: search)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="an Optuna RDB URL (sqlite:///study.db, postgresql://...) shared by several machines; "
                        "default: the journal file <output_dir>/<study>.journal")
    p.add_argument("--prune_after", type=int, default=5,
                   help="finished trials before the median pruner stops any (Optuna's n_startup_trials; default 5)")
    p.add_argument("--prune_warmup", type=int, default=0,
                   help="steps of a trial during which it is never pruned (n_warmup_steps; default 0)")
    p.add_argument("--sampler_seed", type=int, default=None, help="seed of the TPE sampler (default: random)")
    p.add_argument("--max_failures", type=int, default=3,
                   help="failed trials in a row after which the search stops (exit 1; default 3)")
    p.set_defaults(func=cmd_search, takes_command=True)


def cmd_search(args, command_argv: list[str] | None) -> int:
    if args.trials < 1:
        fail(f"--trials must be at least 1; got {args.trials}")
    if args.prune_after < 0 or args.prune_warmup < 0:
        fail("--prune_after and --prune_warmup must be non-negative")
    if args.max_failures < 1:
        fail(f"--max_failures must be at least 1; got {args.max_failures}")
    space = parse_space(args.space)
    if not args.metric.strip() or "," in args.metric:
        fail(f"--metric expects one metric name such as val/accuracy; got {args.metric!r}")
    if not args.study or args.study in (".", "..") or "/" in args.study or os.sep in args.study:
        fail(f"--study {args.study!r}: expected a plain name (no '/')")
    command = parse_command(command_argv)
    for name in ("run_name", "resume", "seeds"):
        if command.has_flag(name):
            fail(f"--{name} {command.flag(name)} in the command: the tool sets it for each trial; leave it out")
    for param in space:
        if command.has_flag(param.name):
            fail(f"--{param.name} is in the command and in --space; leave it out of the command")
    if args.storage is not None and not re.match(r"^[a-z][a-z0-9+]*://", args.storage):
        fail(f"--storage {args.storage}: expected a database URL such as sqlite:///study.db or "
             "postgresql://user@host/db")
    output_dir = command.output_dir()
    command = command.without_flag("output_dir")
    try:
        import optuna
        from optuna.trial import TrialState
    except ImportError:
        fail("optuna is not installed; pip install -r requirements.txt")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # A study written before must match, so a rerun continues the same search.
    settings = {"metric": args.metric, "mode": args.mode, "space": args.space,
                "script": str(command.script), "script_args": command.script_args, "output_dir": str(output_dir)}
    journal = None
    if args.storage is None:
        journal = output_dir / f"{args.study}.journal"
        existing = journal.is_file()
        if not existing:
            refuse_leftover_trials(output_dir, args.study, journal)
        output_dir.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        storage = JournalStorage(JournalFileBackend(str(journal)))
    else:
        existing = True  # unknown: the study may be there already
        try:
            storage = optuna.storages.RDBStorage(args.storage)
        except Exception as e:  # SQLAlchemy's errors: a bad URL, a missing driver, no server
            fail(f"--storage {args.storage}: cannot open ({str(e).splitlines()[0][:200]})")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)] if existing else []
    if args.study in names:
        study = optuna.load_study(study_name=args.study, storage=storage,
                                  pruner=optuna.pruners.MedianPruner(args.prune_after, args.prune_warmup))
        # a continued search must not draw the random start-up values of its first launch again
        seed = None if args.sampler_seed is None else args.sampler_seed + len(study.trials)
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        before = study.user_attrs.get("search", {})
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            fail(f"study {args.study} in {journal or args.storage} was started with other settings "
                 f"({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}); give the same ones, or a new --study")
        print(f"study {args.study}: continuing ({len(study.trials)} trial(s) so far) in {journal or args.storage}")
    else:
        if args.storage is not None:
            refuse_leftover_trials(output_dir, args.study, args.storage)
        study = optuna.create_study(study_name=args.study, storage=storage,
                                    direction="maximize" if args.mode == "max" else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=args.sampler_seed),
                                    pruner=optuna.pruners.MedianPruner(args.prune_after, args.prune_warmup))
        study.set_user_attr("search", settings)
        print(f"study {args.study}: new, in {journal or args.storage}")

    host = socket.gethostname()
    recover_interrupted(study, host)
    failures = 0  # failed trials in a row
    while True:
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                    TrialState.WAITING)]
        if not waiting and len(counted) >= args.trials:
            break
        # the metric is checked until one trial of the study has reported it (a later trial may log it late)
        check_metric = not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in space}
        retry = "run_dir" in trial.user_attrs
        run_dir = Path(trial.user_attrs["run_dir"]) if retry else output_dir / f"{args.study}_t{trial.number}"
        for key, value in (("run_dir", str(run_dir)), ("host", host), ("tool_pid", os.getpid())):
            trial.set_user_attr(key, value)
        if not retry and run_dir.exists():  # another host's trial, or a folder made by hand: never reuse it
            study.tell(trial, state=TrialState.FAIL)
            fail(f"{run_dir} exists but is not a run of trial {trial.number} of study {args.study}; move it away")
        try:
            state, value, status = run_trial(study, trial, command, output_dir, params, run_dir, args.metric,
                                             retry, check_metric)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            write_marker(run_dir, "INTERRUPTED", f"trial {trial.number} of study {args.study} was interrupted; "
                         "a later trial resumes this run directory")
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number, "run_dir": str(run_dir)})
            stop(f"interrupted during trial {trial.number} (run directory {run_dir}); run the same command again "
                 "to continue the study", 130)
        except MetricNotLogged as e:
            study.tell(trial, state=TrialState.FAIL)
            logged = [k for k in e.args[0] if k.startswith(("val", "test"))] or e.args[0]
            if not retry:
                shutil.rmtree(run_dir, ignore_errors=True)
            if len(study.trials) == 1 and journal is not None and not existing:
                journal.unlink(missing_ok=True)  # nothing but this trial was ever in it
            fail(f"--metric {args.metric}: {command.script.name} does not log it (summary.csv of trial "
                 f"{trial.number} has {', '.join(logged)})")
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
            print(f"trial {trial.number}: {args.metric} {value:.6g}", flush=True)
        else:
            study.tell(trial, state=state)
        failures = failures + 1 if state == TrialState.FAIL else 0
        if state == TrialState.FAIL:
            # A script refuses bad flags or values with exit 2 before it makes its run directory (accelerate
            # launch reports any failure as 1): every trial would fail alike.
            if status == 2 or (status and not retry and not run_dir.exists()):
                stop(f"trial {trial.number} failed with exit status {status} before it made its run directory "
                     f"{run_dir}: the script refused a flag of the command or a sampled value; see its message "
                     "above", 2)
            print(f"trial {trial.number}: failed (exit status {status}); see {run_dir / 'train.log'}", flush=True)
            if failures >= args.max_failures:
                stop(f"{failures} trials in a row failed (the last: trial {trial.number}, {run_dir}); fix the "
                     "command, then run the same search again to continue the study", 1)

    header, rows = trials_table(study, space, args.metric)
    print(f"\nstudy {args.study}: {len(rows)} trial(s), {args.metric} ({args.mode}):")
    print(markdown(header, rows))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        print(f"\nbest: trial {best.number}, {args.metric} {best.value:.6g} ({best.user_attrs.get('run_dir')})\n"
              f"$ {best.user_attrs.get('command')}")
    else:
        print("\nno trial finished yet")
    return 0


# ----------------------------------------------------------------------------- entry point

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Commands that launch training take the launch command after --.")
    sub = parser.add_subparsers(dest="tool_command", required=True, parser_class=_Parser)
    for add in TOOL_COMMANDS.values():
        add(sub)
    return parser


# Each subcommand: a function adding its parser (with ``func`` and ``takes_command`` defaults) to the subparsers.
TOOL_COMMANDS = {"compare": add_compare_parser, "seeds": add_seeds_parser, "search": add_search_parser}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    parser = build_parser()
    if not argv:
        fail(f"give a command: {' | '.join(TOOL_COMMANDS)} (see {PROG} --help)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        takes_command = command is None and getattr(args, "takes_command", False)
        hint = "; put the training command after --" if takes_command else ""
        fail(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if command is not None and not getattr(args, "takes_command", False):
        fail(f"{args.tool_command} takes no command after --")
    return args.func(args, command)


if __name__ == "__main__":
    sys.exit(main())
