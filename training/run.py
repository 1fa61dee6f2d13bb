"""Run set-up: the Accelerator, seeding, the run directory, trackers and the run's logger.

Layout of a run (``runs/<task>/<run_name>/``): ``args.yaml`` (the resolved arguments,
loadable again with ``--config``), ``env.yaml`` (git commit, versions, command line,
processes), ``train.log``, ``summary.csv``, ``checkpoints/``, ``best/``, ``final/``,
``figures/`` and the tracker's files (``wandb/`` or ``tensorboard/``).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, broadcast_object_list, set_seed

from training.checkpoint import check_checkpoint, find_latest_checkpoint, is_complete, list_checkpoints
from training.config import UsageError, as_dict, fail
from training.export import check_weights_fit, export_weights, load_weights


@dataclass
class Run:
    dir: Path                  # runs/<task>/<run_name>
    name: str
    resume_from: Path | None   # a complete checkpoint directory, or None for a fresh start
    log: logging.Logger        # console + train.log on the main process, warnings only elsewhere
    init: tuple | None = None  # (state dict, file) of --init_from, read before the run directory existed

    def load_init(self, model) -> None:
        """Copy the ``--init_from`` weights into ``model`` (before ``prepare``); a resumed run's checkpoint
        overrides them later."""
        if self.init is None:
            return
        try:
            load_weights(model, *self.init)
        except UsageError as e:
            fail(f"--init_from {e}")
        self.log.info("initial weights from %s", self.init[1])
        self.init = None  # the state dict is not needed any more

    @property
    def figures_dir(self) -> Path:
        return self.dir / "figures"

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.csv"


def _latest_run_checkpoint(output_dir: Path) -> Path | None:
    """The most recently completed checkpoint over all runs in ``output_dir``."""
    candidates = [find_latest_checkpoint(d) for d in output_dir.glob("*") if d.is_dir()] if output_dir.is_dir() else []
    candidates = [c for c in candidates if c is not None]
    return max(candidates, key=lambda c: (c / "COMPLETE").stat().st_mtime, default=None)


def _newest_sound_checkpoint(run_dir: Path, num_processes: int, skipped: list[str]) -> Path | None:
    """The newest complete checkpoint of a run that ``check_checkpoint`` accepts; the refused ones' reasons
    go to ``skipped``."""
    for path in reversed([p for p in list_checkpoints(run_dir) if is_complete(p)]):
        try:
            check_checkpoint(path, num_processes)
            return path
        except UsageError as e:
            skipped.append(str(e))
    return None


def resolve_run(args, task: str, num_processes: int = 1) -> tuple[Path, Path | None, list[str]]:
    """Pick the run directory and the checkpoint to resume from; raise UsageError on a bad ``--resume``.

    Returns (run directory, checkpoint or None, warnings). With ``--resume auto`` or a run directory, a
    checkpoint that ``check_checkpoint`` refuses is skipped for the previous complete one (with a warning);
    an explicitly named checkpoint is refused.
    """
    output_dir = Path(args.output_dir)
    run_name = getattr(args, "run_name", None)
    skipped: list[str] = []
    if args.resume is None:
        name = run_name or time.strftime("%Y%m%d-%H%M%S") + f"_s{args.seed}"
        return output_dir / name, None, skipped
    if args.resume == "auto":
        latest = None if run_name else _latest_run_checkpoint(output_dir)
        run_dir = output_dir / run_name if run_name else (latest.parent.parent if latest else None)
        if run_dir is None:
            return output_dir / (time.strftime("%Y%m%d-%H%M%S") + f"_s{args.seed}"), None, skipped
        ckpt = _newest_sound_checkpoint(run_dir, num_processes, skipped)
        if ckpt is None and skipped:
            raise UsageError(f"--resume auto: no checkpoint of {run_dir} can be resumed safely: {skipped[-1]}")
        return run_dir, ckpt, skipped
    path = Path(args.resume)
    if not path.is_dir():
        raise UsageError(f"--resume {path}: no such checkpoint or run directory")
    if (path / "checkpoints").is_dir():
        if find_latest_checkpoint(path) is None:
            raise UsageError(f"--resume {path}: no complete checkpoint (checkpoints/step_*/ with a COMPLETE marker) inside")
        ckpt = _newest_sound_checkpoint(path, num_processes, skipped)
        if ckpt is None:
            raise UsageError(f"--resume {path}: no checkpoint can be resumed safely: {skipped[-1]}")
        return path, ckpt, skipped
    if not is_complete(path):
        raise UsageError(f"--resume {path}: not a complete checkpoint (no COMPLETE marker: interrupted while saving, "
                         "or not a checkpoint/run directory)")
    try:
        check_checkpoint(path, num_processes)
    except UsageError as e:
        raise UsageError(f"--resume {e}") from None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else output_dir / (run_name or path.name)
    return run_dir, path, skipped


def _make_run_dir(run_dir: Path) -> None:
    """Create the run directory (and ``figures/``) and make sure files can be written there."""
    try:
        (run_dir / "figures").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {run_dir.parent}: cannot write the run directory {run_dir.name} there "
                         f"({e.strerror or e})") from None


def _git_commit(repo: Path) -> dict:
    def git(*cmd):
        out = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def _make_logger(run_dir: Path, is_main: bool) -> logging.Logger:
    log = logging.getLogger("train")
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if is_main:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    return log


def _wandb_init_kwargs(run_dir: Path, run_name: str) -> dict:
    """W&B offline unless the user chose a mode or is logged in; all its files inside the run."""
    if "WANDB_MODE" in os.environ:
        mode = os.environ["WANDB_MODE"]
    else:
        netrc = Path.home() / ".netrc"
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
        mode = "online" if logged_in else "offline"
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / ".data"))
    if mode != "online":
        os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir / "wandb" / ".config"))
    # Runs named <group>_s<seed> (the seeds of one multi-seed launch) share a W&B group.
    group = re.sub(r"_s\d+$", "", run_name)
    return {"wandb": {"name": run_name, "group": group, "dir": str(run_dir), "mode": mode,
                      "id": run_name.replace("/", "-"), "resume": "allow"}}


def _check_same_model(run_dir: Path, model_json: dict) -> None:
    """A resumed run must rebuild the model its checkpoints hold: its model.json and the flags' record agree
    (a setting without weights, such as an input normalisation, would otherwise change silently)."""
    path = run_dir / "model.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"--resume: {path} is not readable JSON") from None
    if saved != model_json:
        old, new = saved.get("kwargs", {}), model_json.get("kwargs", {})
        keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k)) or ["class"]
        raise UsageError(f"--resume: {run_dir} was trained with other model settings ({', '.join(keys)}); resume "
                         f"with the flags of its args.yaml, or start a new --run_name")


def start_run(args, task: str, model_json: dict | None = None) -> tuple[Accelerator, Run]:
    """Create the Accelerator and the run directory; write ``args.yaml``/``env.yaml``; start trackers.

    ``args`` must have: output_dir, seed, resume, cpu, mixed_precision, grad_accum, batch_size,
    report_to (and optionally run_name, init_from). Bad ``--resume`` or ``--init_from`` values end the program
    (exit 2) before anything is written; ``--init_from`` weights are checked against ``model_json`` (the
    ``training.export.model_record`` of the model the script will build) then.
    """
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        # Groups never end at an epoch boundary: a short tail group would be divided by grad_accum
        # anyway and count less than the others. Checkpoints are taken at group ends only.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
        log_with=None if args.report_to == "none" else args.report_to,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The TensorBoard tracker is checked for a logging dir here; the run directory replaces it below.
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.output_dir),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        fail(f"launched with WORLD_SIZE={world_size} but Accelerate sees 1 process; on a machine without GPUs "
             "pass --cpu or set ACCELERATE_USE_CPU=1 (otherwise every process trains alone as rank 0)")
    set_seed(args.seed)
    init = None
    if getattr(args, "init_from", None):
        try:
            init = export_weights(args.init_from)
            if model_json is not None:
                check_weights_fit(model_json, *init)
        except UsageError as e:
            fail(f"--init_from {e}")

    # The main process decides (timestamps differ between ranks); everyone gets the same answer.
    decision = [None]
    if accelerator.is_main_process:
        try:
            decision = [resolve_run(args, task, accelerator.num_processes)]
            if decision[0][1] is not None and model_json is not None:
                _check_same_model(decision[0][0], model_json)
            _make_run_dir(decision[0][0])
        except UsageError as e:
            decision = [str(e)]
    decision = broadcast_object_list(decision) if accelerator.num_processes > 1 else decision
    if isinstance(decision[0], str):
        fail(decision[0])
    run_dir, resume_from, skipped = decision[0]

    accelerator.wait_for_everyone()
    log = _make_logger(run_dir, accelerator.is_main_process)
    run = Run(dir=run_dir, name=run_dir.name, resume_from=resume_from, log=log, init=init)

    config = as_dict(args)
    derived = {
        "effective_batch_size": args.batch_size * args.grad_accum * accelerator.num_processes,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision_resolved": accelerator.mixed_precision,
    }
    if accelerator.is_main_process:
        args_path = run_dir / "args.yaml"
        if resume_from is not None and args_path.exists():
            previous = yaml.safe_load(args_path.read_text()) or {}
            changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v and k != "resume"}
            if changed:
                log.warning("resuming with changed arguments (old, new): %s", changed)
        else:
            args_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {
            "task": task, **_git_commit(Path(sys.argv[0]).resolve().parent), "command": sys.argv,
            "python": platform.python_version(), "torch": str(torch.__version__),
            "accelerate": str(sys.modules["accelerate"].__version__), "host": platform.node(), **derived,
        }
        (run_dir / "env.yaml").write_text(yaml.safe_dump(env, sort_keys=False))

    if args.report_to != "none":
        accelerator.project_configuration = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
        init_kwargs = _wandb_init_kwargs(run_dir, run.name) if args.report_to == "wandb" else {}
        accelerator.init_trackers(task, config={**config, **derived}, init_kwargs=init_kwargs)

    log.info("run %s: %d process(es) (%s), device %s, mixed precision %s, effective batch %d",
             run_dir, accelerator.num_processes, derived["distributed_type"], accelerator.device,
             accelerator.mixed_precision, derived["effective_batch_size"])
    for reason in skipped:
        log.warning("skipped %s", reason)
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    return accelerator, run


def log_images(accelerator, run: Run, images: dict, step: int) -> None:
    """Save RGB uint8 arrays (H, W, 3) as ``figures/<name>_step<step>.png`` and send them to the tracker.

    Main process only. ``images`` maps a tracker key such as ``"vis/overlay"`` to an array.
    """
    import cv2

    for key, image in images.items():
        path = run.figures_dir / f"{key.replace('/', '_')}_step{step:08d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
        elif tracker.name == "tensorboard":
            for k, v in images.items():
                tracker.writer.add_image(k, v, global_step=step, dataformats="HWC")
