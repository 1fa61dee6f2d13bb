"""Full-state checkpoints with ``accelerator.save_state``, rotation, best/final exports, exact resume.

Layout: ``<run>/checkpoints/step_XXXXXXXX/`` holds what ``save_state`` writes (model weights
as safetensors; optimizer, sampler and the RNG states of every rank, which Accelerate reads back with
``torch.load(weights_only=True)``), the registered objects (LR scheduler, loop state, early
stopping, EMA) as ``registered.json`` plus their tensors in ``registered.safetensors``, ``meta.json``
and, written last, an empty ``COMPLETE`` marker: a folder without it was interrupted while saving
and is never resumed from.

The registered objects do not go through Accelerate's ``register_for_checkpointing``: Accelerate
unpickles those with ``weights_only=False``, so a crafted checkpoint could run code when resumed.
``check_checkpoint`` refuses a checkpoint whose files cannot be read safely or completely (a
``custom_checkpoint_*.pkl``, a corrupt RNG state, a truncated weights file) before anything is loaded. ``best/`` and ``final/`` hold
``model.safetensors``, ``model_ema.safetensors``, ``model.json`` (how to rebuild the model,
see ``training.export``), ``metrics.json``, ``args.yaml`` and the script's extra files.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from training.config import UsageError, fail
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


REGISTERED_JSON, REGISTERED_TENSORS = "registered.json", "registered.safetensors"
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def _encode(value, tensors: dict):
    """A state dict as JSON values; tensors go to ``tensors`` and leave a ``{"__tensor__": key}`` behind."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint "
                    "(tensors, numbers, strings, None, lists, tuples and dicts only)")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def save_registered(objects, path: Path) -> None:
    """Write the ``state_dict()`` of every object as ``registered.json`` + ``registered.safetensors``."""
    tensors: dict = {}
    records = [{"type": type(obj).__name__, "state": _encode(obj.state_dict(), tensors)} for obj in objects]
    save_file(tensors, path / REGISTERED_TENSORS)
    (path / REGISTERED_JSON).write_text(json.dumps({"objects": records}, indent=1))


def read_registered(path: Path) -> list[dict]:
    """The records of ``save_registered`` with their tensors back in place; UsageError when unreadable."""
    try:
        records = json.loads((path / REGISTERED_JSON).read_text())["objects"]
        tensors = load_file(path / REGISTERED_TENSORS)
        return [{"type": r["type"], "state": _decode(r["state"], tensors)} for r in records]
    except FileNotFoundError as e:
        raise UsageError(f"checkpoint {path}: no {Path(e.filename).name} (the scheduler, loop and early-stopping "
                         "state)") from None
    except (ValueError, KeyError, TypeError, SafetensorError, OSError) as e:
        raise UsageError(f"checkpoint {path}: {REGISTERED_JSON}/{REGISTERED_TENSORS} unreadable "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_rng_state(file: Path) -> dict:
    """One rank's ``random_states_*.pkl`` read the way Accelerate reads it (``weights_only=True``)."""
    try:
        states = accelerate_load(file)
        missing = [k for k in _RNG_KEYS if k not in states]
    except Exception as e:  # torch.load raises many types on a corrupt or crafted file; all mean "refuse it"
        raise UsageError(f"checkpoint {file.parent}: {file.name} cannot be read safely "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    if missing:
        raise UsageError(f"checkpoint {file.parent}: {file.name} lacks {', '.join(missing)}")
    return states


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return {}  # written by every save; an older checkpoint may lack it
    return meta if isinstance(meta, dict) else {}


def check_checkpoint(path: Path, num_processes: int = 1) -> None:
    """Refuse (UsageError) a checkpoint that cannot be resumed exactly and safely, before anything is loaded.

    Checked: the COMPLETE marker; no ``custom_checkpoint_*.pkl`` (objects Accelerate would unpickle with
    ``weights_only=False``); one readable RNG state per process of this launch (Accelerate would skip a
    corrupt one silently and resume inexactly) and the process count it was saved by; no
    torch.distributed.checkpoint folder (FSDP sharded states, read with pickle); the registered objects; the
    safetensors headers and the torch zip archives (a truncated file).
    """
    path = Path(path)
    if not is_complete(path):
        raise UsageError(f"checkpoint {path}: no COMPLETE marker (interrupted while saving, or not a checkpoint)")
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise UsageError(f"checkpoint {path}: holds {', '.join(pickles)}, objects that only unpickling with code "
                         "execution can read (an older checkpoint format, or a crafted file); refused")
    for rank in range(num_processes):
        file = path / f"random_states_{rank}.pkl"
        if not file.is_file():
            raise UsageError(f"checkpoint {path}: no {file.name} (saved by fewer processes than the {num_processes} "
                             "of this launch?)")
        read_rng_state(file)
    saved_by = _read_meta(path).get("num_processes")
    if isinstance(saved_by, int) and saved_by != num_processes:
        # The loop position counts batches per process and each rank has its own RNG state: with another
        # process count the data order, the effective batch and the random draws would not continue exactly.
        raise UsageError(f"checkpoint {path}: saved by {saved_by} process(es), this launch has {num_processes}; "
                         f"resume it with {saved_by} (an exact resume needs the same process count)")
    dcp = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name == ".metadata" or p.suffix == ".distcp")
    if dcp:
        raise UsageError(f"checkpoint {path}: holds a torch.distributed.checkpoint folder ({dcp[0]}: FSDP's "
                         "SHARDED_STATE_DICT), whose .metadata only pickle can read; refused. Save FSDP runs with "
                         "fsdp_state_dict_type FULL_STATE_DICT, as accelerate_configs/fsdp.yaml does")
    read_registered(path)
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise UsageError(f"checkpoint {path}: {file.name} is not a complete safetensors file ({e})") from None
    for file in [*path.glob("*.bin"), *path.glob("*.pt")]:
        if not zipfile.is_zipfile(file):
            raise UsageError(f"checkpoint {path}: {file.name} is not a complete torch archive (truncated?)")


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
        self.objects: list = []
        if model_json is not None and accelerator.is_main_process:
            (run.dir / MODEL_JSON).write_text(json.dumps(model_json, indent=1))

    def register(self, *objects) -> None:
        """Objects with ``state_dict``/``load_state_dict`` saved with every checkpoint (in this order)."""
        self.objects += objects

    def resume(self, state: TrainState) -> None:
        """Load the checkpoint chosen (and checked) by ``start_run`` (``--resume``), if any.

        A file that still fails to load (a crafted optimizer pickle that ``weights_only`` refuses) ends the
        program with one line; so does a checkpoint whose RNG state was not restored.
        """
        path = self.run.resume_from
        if path is None:
            return
        try:
            self.accelerator.load_state(str(path))
            records = read_registered(path)
            if [r["type"] for r in records] != [type(o).__name__ for o in self.objects]:
                raise UsageError(f"checkpoint {path}: holds {[r['type'] for r in records]}, this script registers "
                                 f"{[type(o).__name__ for o in self.objects]}")
            for obj, record in zip(self.objects, records):
                obj.load_state_dict(record["state"])
            saved = read_rng_state(path / f"random_states_{self.accelerator.process_index}.pkl")
            if not torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]):
                raise UsageError(f"checkpoint {path}: the random states were not restored; exact resume impossible")
        except UsageError as e:
            fail(f"--resume {e}")
        except Exception as e:  # a file Accelerate could not read (weights_only refusal, corruption)
            fail(f"--resume checkpoint {path}: cannot be loaded ({type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:200]})")
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
            save_registered(self.objects, path)  # identical on every rank
            meta = {"global_step": state.global_step, "epoch": state.epoch, "monitor": self.monitor,
                    "value": state.last_metrics.get(self.monitor), "num_processes": self.accelerator.num_processes}
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
            # copy=True: tied weights (a language model's decoder and embeddings) share storage, which
            # safetensors refuses; each key gets its own copy, so a strict load_state_dict finds all of them.
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()},
                      tmp / "model.safetensors")
            if ema is not None:
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in ema.module.state_dict().items()},
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
