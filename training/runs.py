"""The runs tool: many runs of one train script, for any task.

    python -m training.runs seeds --seeds 42,2023,2024 [--name NAME] -- \\
        accelerate launch [launch flags] train_pair.py --config configs/pair_fusion.yaml [script flags]

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

Mistakes in the tool's flags or in the command (a bad seed list, no command, no
``train_*.py`` in it, a flag the tool sets itself) end with one line and exit status 2
before anything is launched. The tool never imports a train script.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
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
TOOL_COMMANDS = {"seeds": add_seeds_parser}


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
