"""Full-state checkpoints with ``accelerator.save_state``, rotation, best/final exports, exact resume.

Layout: ``<run>/checkpoints/step_XXXXXXXX/`` holds what ``save_state`` writes (model,
optimizer, RNG states of every rank, the registered objects as ``custom_checkpoint_i.pkl``)
plus ``meta.json`` and, written last, an empty ``COMPLETE`` marker: a folder without it
was interrupted while saving and is never resumed from. ``best/`` and ``final/`` hold
``model.safetensors``, ``model_ema.safetensors``, ``model.json`` (how to rebuild the model,
see ``training.export``), ``metrics.json``, ``args.yaml`` and the script's extra files.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.export import MODEL_JSON

_STEP_DIR = re.compile(r"^step_(\d{8})$")
# fp16: GradScaler halves its scale at every skipped step, so 20 skips in a row take its initial 2^16 below 1,
# far past any real overflow; only a loss that is NaN at every scale gets there.
MAX_SKIPPED_IN_A_ROW = 20


def is_complete(path: Path) -> bool:
    return (Path(path) / "COMPLETE").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """All ``step_*`` folders of a run (complete or not), oldest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step complete checkpoint of a run; partial folders are skipped."""
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    return complete[-1] if complete else None


@dataclass
class TrainState:
    """Loop position and selection state; registered for checkpointing so resume is exact."""
    epoch: int = 0
    step_in_epoch: int = 0      # micro-batches of the current epoch already consumed (per process)
    global_step: int = 0        # optimizer updates
    best: float | None = None   # best monitored value so far
    best_step: int = -1
    last_metrics: dict = field(default_factory=dict)  # the latest evaluation, used to rank checkpoints

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Checkpointer:
    """Saves and rotates full-state checkpoints, exports best/final weights, resumes exactly.

    Rotation keeps the ``keep_last`` newest checkpoints plus the ``save_top_k`` best by
    ``monitor`` (the metric of the evaluation preceding each save); the rest are deleted.
    Register the same objects in the same order in every run: Accelerate restores them by
    position.
    """

    def __init__(self, accelerator, run, monitor: str, mode: str = "max", keep_last: int = 3, save_top_k: int = 1,
                 model_json: dict | None = None, export_files: tuple[str, ...] = ()):
        """``model_json``: ``training.export.model_record`` of the model, written to the run and every export;
        ``export_files``: files of the run directory copied into every export (e.g. ``simulation.yaml``)."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.accelerator, self.run = accelerator, run
        self.monitor, self.mode = monitor, mode
        self.keep_last, self.save_top_k = keep_last, save_top_k
        self.export_files = ("args.yaml", *((MODEL_JSON,) if model_json is not None else ()), *export_files)
        self.skipped_in_a_row = 0  # fp16 steps the scaler skipped since the last finite gradient norm
        if model_json is not None and accelerator.is_main_process:
            (run.dir / MODEL_JSON).write_text(json.dumps(model_json, indent=1))

    def register(self, *objects) -> None:
        self.accelerator.register_for_checkpointing(*objects)

    def resume(self, state: TrainState) -> None:
        """Load the checkpoint chosen by ``start_run`` (``--resume``), if any."""
        if self.run.resume_from is None:
            return
        self.accelerator.load_state(str(self.run.resume_from))
        self.run.log.info("resumed at update %d (epoch %d, %d batches into it)",
                          state.global_step, state.epoch, state.step_in_epoch)

    def remaining_batches(self, dataloader, state: TrainState):
        """Iterate the rest of epoch ``state.epoch``, skipping the batches a resumed run already used; when the
        epoch is used up, ``state.epoch`` moves on.

        The epoch goes to the sampler (with the seedable sampler the order then depends only on
        (seed, epoch), so skipping reproduces the interrupted epoch) and to the dataset when it draws fresh
        samples per epoch: Accelerate forwards it to the dataset only in some sampler layouts.
        """
        dataloader.set_epoch(state.epoch)
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(state.epoch)
        skip = state.step_in_epoch
        loader = self.accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            state.step_in_epoch += 1
            yield batch
        state.epoch, state.step_in_epoch = state.epoch + 1, 0

    def check_finite(self, grad_norm: torch.Tensor, state: TrainState) -> None:
        """Stop the run (exit status 1, last good checkpoint kept) when an update's gradient norm is not finite.

        Call once per optimizer update with the norm ``clip_grad_norm_`` returned: it is computed after the
        gradient all-reduce, so every rank sees the same value and decides alike without another collective.
        A non-finite loss makes it non-finite too. Under fp16 an overflow is the scaler's business: it skips
        that step (``optimizer_step_was_skipped``) and halves its scale, so a few skips are normal; a NaN loss
        makes every step skip, so MAX_SKIPPED_IN_A_ROW skips in a row stop the run as well.
        """
        if bool(torch.isfinite(grad_norm)):
            self.skipped_in_a_row = 0
            return
        if self.accelerator.optimizer_step_was_skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
                return
        self.run.log.error("non-finite loss at update %d (gradient norm %s, epoch %d); stopping. The last good "
                           "checkpoint is kept in %s", state.global_step + 1, float(grad_norm), state.epoch,
                           self.run.dir / "checkpoints")
        self.accelerator.end_training()
        raise SystemExit(1)

    def is_better(self, value: float, reference: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if reference is None:
            return True
        return value > reference if self.mode == "max" else value < reference

    def save(self, state: TrainState) -> Path:
        """``save_state`` into ``checkpoints/step_XXXXXXXX/``, mark it complete, rotate. All ranks call this."""
        path = self.run.dir / "checkpoints" / f"step_{state.global_step:08d}"
        if self.accelerator.is_main_process and path.exists():
            shutil.rmtree(path)  # a partial folder left by an interrupted save of this step
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            meta = {"global_step": state.global_step, "epoch": state.epoch, "monitor": self.monitor,
                    "value": state.last_metrics.get(self.monitor)}
            (path / "meta.json").write_text(json.dumps(meta, indent=1))
            (path / "COMPLETE").touch()
            self._rotate()
        self.accelerator.wait_for_everyone()
        return path

    def _rotate(self) -> None:
        checkpoints = list_checkpoints(self.run.dir)
        complete = [p for p in checkpoints if is_complete(p)]
        keep = set(complete[-self.keep_last:]) if self.keep_last > 0 else set()
        scored = []
        for p in complete:
            value = json.loads((p / "meta.json").read_text()).get("value")
            if value is not None and math.isfinite(value):
                scored.append((value, p))
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        keep |= {p for _, p in scored[: self.save_top_k]}
        for p in checkpoints:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def update_best(self, state: TrainState, metrics: dict, model, ema=None) -> bool:
        """Export ``best/`` when ``metrics[monitor]`` beats the best so far. All ranks call this."""
        value = metrics.get(self.monitor)
        is_best = self.is_better(value, state.best)  # decided before the best is overwritten
        if is_best:
            state.best, state.best_step = float(value), state.global_step
            self.export("best", model, ema, metrics, state)
        return is_best

    def export(self, name: str, model, ema, metrics: dict, state: TrainState) -> Path:
        """Write ``<run>/<name>/`` atomically: weights (raw and EMA) as safetensors, metrics.json, and the run's
        args.yaml, model.json and extra files (``export_files``)."""
        weights = self.accelerator.get_state_dict(model)  # gathers FSDP shards; every rank must call it
        target = self.run.dir / name
        if self.accelerator.is_main_process:
            tmp = self.run.dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
            if ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()},
                          tmp / "model_ema.safetensors")
            record = {"global_step": state.global_step, "epoch": state.epoch, **metrics}
            (tmp / "metrics.json").write_text(json.dumps(record, indent=1))
            for file in self.export_files:
                if (self.run.dir / file).exists():
                    shutil.copy(self.run.dir / file, tmp / file)
            old = self.run.dir / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return target

    def export_final(self, model, ema, metrics: dict, state: TrainState) -> Path:
        return self.export("final", model, ema, metrics, state)
