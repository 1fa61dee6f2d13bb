"""Exports that rebuild their own model, and the one loader for them.

An export (``<run>/best/``, ``<run>/final/``) holds ``model.safetensors`` (and
``model_ema.safetensors`` when the run keeps an EMA), ``model.json`` (the model's class
and constructor keyword arguments), ``args.yaml``, ``metrics.json`` and any file the
script asks to carry along (``simulation.yaml`` for SMLM). ``load_export`` rebuilds the
model from ``model.json`` alone, so predict/fit scripts and benchmarks never import a
``train_*.py``. ``model.json`` names a class inside the repository's ``models`` package
only, and weights load through safetensors only: an export from an untrusted source
cannot run code.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from training.config import UsageError, fail

MODEL_JSON = "model.json"
EXPORT_NAMES = ("best", "final")
# Prefixes a model's state-dict keys get from its wrappers in a save_state checkpoint
# (DDP's module., torch.compile's _orig_mod.); exports are always written unwrapped.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def model_record(cls: type, **kwargs) -> dict:
    """The JSON record ``build_model`` rebuilds ``cls(**kwargs)`` from; kwargs must be JSON values."""
    if not cls.__module__.startswith("models."):
        raise ValueError(f"{cls.__qualname__}: exportable models live in the models package, not {cls.__module__}")
    record = {"module": cls.__module__, "class": cls.__qualname__, "kwargs": kwargs}
    return json.loads(json.dumps(record))  # tuples become lists now, not only after a round trip through a file


def build_model(record: dict, source: str = "model.json") -> torch.nn.Module:
    """``cls(**kwargs)`` of a ``model_record``; only classes of the ``models`` package are accepted."""
    try:
        module_name, class_name, kwargs = record["module"], record["class"], record["kwargs"]
    except (KeyError, TypeError):
        raise UsageError(f"{source}: expected keys module, class and kwargs") from None
    if not isinstance(module_name, str) or not module_name.startswith("models.") or not isinstance(kwargs, dict):
        raise UsageError(f"{source}: module must name a module of the models package and kwargs a mapping")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, TypeError):
        raise UsageError(f"{source}: no model class {module_name}.{class_name}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise UsageError(f"{source}: {module_name}.{class_name} is not a model class")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {class_name}({', '.join(kwargs)}) failed: {e}") from None


@dataclass
class Export:
    model: torch.nn.Module    # in eval mode, on the CPU
    args: dict                # the run's args.yaml
    metrics: dict             # metrics.json of the export ({} for a checkpoint)
    folder: Path              # the export or checkpoint folder the weights came from
    weights: Path             # the safetensors file that was loaded
    record_dir: Path          # the folder holding model.json, args.yaml and the run's extra files
    record: dict              # model.json: module, class and constructor kwargs


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return value


def resolve_export(path: str | Path) -> tuple[Path, Path]:
    """(folder holding the weights, folder holding model.json and args.yaml) for a run directory
    (its best/, else final/), an export folder, or a ``checkpoints/step_*`` folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent  # an export's weights file names its export
    if not path.is_dir():
        raise UsageError(f"{path}: no such run, export or checkpoint directory")
    if path.parent.name == "checkpoints" and (path / "model.safetensors").is_file():
        if not (path / "COMPLETE").is_file():
            raise UsageError(f"{path}: an incomplete checkpoint (no COMPLETE marker: interrupted while saving)")
        return path, path.parent.parent  # a full-state checkpoint: model.json and args.yaml are the run's
    if (path / "model.safetensors").is_file():
        return path, path
    for name in EXPORT_NAMES:
        if (path / name / "model.safetensors").is_file():
            return path / name, path / name
    raise UsageError(f"{path}: not a run directory with a best/ or final/ export, an export folder or a complete "
                     "checkpoint (no model.safetensors found)")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict, wrapper prefixes stripped; one-line error on a bad file."""
    try:
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    stripped = True
    while weights and stripped:  # wrappers nest (a compiled DDP model: module._orig_mod.)
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in weights):
                weights, stripped = {k[len(prefix):]: v for k, v in weights.items()}, True
    return weights


def export_weights_path(folder: Path, ema: bool = True) -> Path:
    """The EMA weights when asked for and present (they are what best/ was selected on), else the raw ones."""
    if ema and (folder / "model_ema.safetensors").is_file():
        return folder / "model_ema.safetensors"
    return folder / "model.safetensors"


def export_weights(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict, file) of the weights of an export, run directory or checkpoint, e.g. for ``--init_from``."""
    folder, _ = resolve_export(path)
    file = export_weights_path(folder, ema)
    return read_weights(file), file


def check_weights_fit(record: dict, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Raise a one-line UsageError unless ``weights`` has exactly the keys and shapes of the model of ``record``;
    the model is built on the meta device, so this costs no memory and can run before anything is written."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(record).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    if missing or unexpected or wrong:
        first = (f"{len(missing)} tensors missing, e.g. {missing[0]}" if missing else
                 f"{len(unexpected)} tensors unexpected, e.g. {unexpected[0]}" if unexpected else
                 f"{len(wrong)} tensors of another shape, e.g. {wrong[0]}: {tuple(weights[wrong[0]].shape)} "
                 f"instead of {expected[wrong[0]]}")
        raise UsageError(f"{source}: weights do not fit the model: {first}")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``weights`` (read from ``source``) into ``model`` (strict); one-line error naming the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UsageError(f"{source}: weights do not fit the model ({str(e).strip().splitlines()[0]})") from None


def load_export(path: str | Path, ema: bool = True) -> Export:
    """Rebuild the model of an export, run directory or checkpoint and load its weights (EMA ones if ``ema``
    and present; a ``.safetensors`` file of an export loads that file). Raises ``UsageError`` with one line naming the file on anything missing or malformed."""
    named = Path(path) if Path(path).is_file() and Path(path).suffix == ".safetensors" else None
    folder, record_dir = resolve_export(path)
    if not (record_dir / MODEL_JSON).is_file() and (record_dir.parent / MODEL_JSON).is_file():
        record_dir = record_dir.parent  # an export folder without its own copy: the run's files beside it
    record_path = record_dir / MODEL_JSON
    if not record_path.is_file():
        raise UsageError(f"{record_path}: not found; the export does not say how to rebuild its model "
                         "(made by an older version of the training script?)")
    record = _read_json(record_path)
    model = build_model(record, source=str(record_path))
    weights = named or export_weights_path(folder, ema)
    load_weights(model, read_weights(weights), weights)
    args = {}
    args_path = next((d / "args.yaml" for d in (record_dir, record_dir.parent) if (d / "args.yaml").is_file()), None)
    if args_path is not None:
        try:
            args = yaml.safe_load(args_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"{args_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    metrics = _read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    return Export(model=model.eval(), args=args, metrics=metrics, folder=folder, weights=weights, record_dir=record_dir,
                  record=record)


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, checked before any work; one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA device is available (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N")
    return device


def load_export_or_exit(path: str | Path, device: torch.device, flag: str = "--checkpoint") -> Export:
    """``load_export`` for command-line scripts: the model moved to ``device``; a bad path ends the program
    with one line naming ``flag`` (exit status 2)."""
    try:
        export = load_export(path)
    except UsageError as e:
        fail(f"{flag} {e}")
    export.model.to(device)
    return export
