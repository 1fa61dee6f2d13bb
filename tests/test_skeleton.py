"""The shape every train_*.py shares, and the import boundaries around the scripts.

In the spirit of Accelerate's ``ExampleDifferenceTests``: each training script is read (its AST, nothing
is run) and must keep every part of the common skeleton of DESIGN.md, so a new script copied from an
old one cannot silently drop exact resume, the final export or the per-update finite check. A new
``train_*.py`` is picked up by the glob and must pass unchanged.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

import pytest

from conftest import ROOT
from training.config import _field_help

SCRIPTS = sorted(p.name for p in ROOT.glob("train_*.py"))
MAIN_MAX_LINES = 100
STEP_MAX_LINES = 40

# The command-line contract of DESIGN.md: one name, one type, in every script.
CONTRACT = {
    "config": "str | None", "output_dir": "str", "run_name": "str | None", "batch_size": "int", "grad_accum": "int",
    "lr": "float", "seed": "int", "mixed_precision": "Literal['no', 'fp16', 'bf16'] | None", "cpu": "bool",
    "num_workers": "int", "log_every_steps": "int", "eval_every_steps": "int | None",
    "save_every_steps": "int | None", "keep_last": "int", "save_top_k": "int", "resume": "str | None",
    "init_from": "str | None", "report_to": "Literal['wandb', 'tensorboard', 'none']", "clip_grad": "float",
    "num_figures": "int", "patience": "int",
}
# Calls (as source text) every main() makes, in this order: parse, run, prepare, checkpoint set-up, resume,
# the loop's pieces, the final export.
MAIN_CALLS = ["start_run", "run.load_init", "accelerator.prepare", "Checkpointer", "ckpt.register", "ckpt.resume",
              "stopper.stopped", "TrainMeter", "ckpt.remaining_batches", "train_step", "meter.add",
              "ckpt.check_finite", "meter.write", "stopper.should_stop", "ckpt.save", "ckpt.export_final",
              "accelerator.end_training"]
# Calls whose place varies (--init_from also evaluates before the loop).
MAIN_ALSO = ["ckpt.update_best", "validate"]
STEP_CALLS = ["accelerator.accumulate", "accelerator.backward", "accelerator.clip_grad_norm_", "optimizer.step",
              "optimizer.zero_grad"]


def _tree(name: str) -> ast.Module:
    return ast.parse((ROOT / name).read_text(), filename=name)


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"no top-level function {name}()"
    return found[0]


def _calls(node: ast.AST) -> list[str]:
    """Source text of every called function and every attribute read, in source order (e.g. 'ckpt.save',
    'train_step', 'stopper.stopped')."""
    found = [(n.lineno, n.col_offset, ast.unparse(n.func)) for n in ast.walk(node) if isinstance(n, ast.Call)]
    found += [(n.lineno, n.col_offset, ast.unparse(n)) for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    return [text for _, _, text in sorted(found)]


def test_there_are_training_scripts():
    assert {"train_captcha.py", "train_pair.py", "train_smlm.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_follows_the_common_skeleton(script):
    tree = _tree(script)
    main = _function(tree, "main")
    calls = _calls(main)
    positions = []
    for part in MAIN_CALLS:
        assert part in calls, f"{script}: main() never calls {part}"
        positions.append(calls.index(part))
    assert positions == sorted(positions), f"{script}: main() calls the skeleton out of order: " \
        f"{[MAIN_CALLS[i] for i in sorted(range(len(positions)), key=positions.__getitem__)]}"
    for part in MAIN_ALSO:
        assert part in calls, f"{script}: main() never calls {part}"
    assert any(c.startswith("parse_") for c in calls), f"{script}: main() does not start with parse_args"
    # Saved at the last update and on an early stop, not only every N updates.
    saves = [n for n in ast.walk(main) if isinstance(n, ast.If) and "ckpt.save" in _calls(n)]
    assert any({"stop", "last_step"} <= {x.id for x in ast.walk(s.test) if isinstance(x, ast.Name)} for s in saves), \
        f"{script}: ckpt.save(...) must also run when stop or last_step"
    # No for ... else epoch counter: remaining_batches moves the epoch on.
    assert not any(isinstance(n, ast.For) and n.orelse for n in ast.walk(main)), f"{script}: for ... else in main()"
    length = main.end_lineno - main.lineno + 1
    assert length <= MAIN_MAX_LINES, f"{script}: main() is {length} lines (at most {MAIN_MAX_LINES})"


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_step_is_one_plain_function(script):
    step = _function(_tree(script), "train_step")
    assert [a.arg for a in step.args.args] == ["model", "batch", "optimizer", "accelerator", "args"], script
    calls = _calls(step)
    for part in STEP_CALLS:
        assert part in calls, f"{script}: train_step never calls {part}"
    length = step.end_lineno - step.lineno + 1
    assert length <= STEP_MAX_LINES, f"{script}: train_step is {length} lines (at most {STEP_MAX_LINES})"
    returns = [n for n in ast.walk(step) if isinstance(n, ast.Return)]
    assert len(returns) == 1 and isinstance(returns[0].value, ast.Tuple) and len(returns[0].value.elts) == 3, \
        f"{script}: train_step must return (loss, parts, grad_norm)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_args_keep_the_command_line_contract(script):
    args_cls = importlib.import_module(script[:-3]).Args
    hints = typing.get_type_hints(args_cls)
    for name, expected in CONTRACT.items():
        assert name in hints, f"{script}: Args has no --{name}"
        shown = str(hints[name]).replace("typing.", "").replace("Optional[", "").replace("NoneType", "None")
        got = " | ".join(sorted(_type_names(hints[name])))
        assert got == " | ".join(sorted(_type_names_from_text(expected))), f"{script}: --{name} is {shown}"
    assert "max_steps" in hints, script


def _type_names(tp) -> set[str]:
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return set().union(*(_type_names(a) for a in typing.get_args(tp)))
    if typing.get_origin(tp) is typing.Literal:
        return {f"Literal{sorted(map(str, typing.get_args(tp)))}"}
    return {"None" if tp is type(None) else tp.__name__}


def _type_names_from_text(text: str) -> set[str]:
    names = set()
    for part in text.split(" | "):
        if part.startswith("Literal["):
            names.add(f"Literal{sorted(v.strip(chr(39)) for v in part[8:-1].split(', '))}")
        else:
            names.add(part)
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_text(script):
    args_cls = importlib.import_module(script[:-3]).Args
    helps = _field_help(args_cls)
    missing = [f.name for f in dataclasses.fields(args_cls) if not helps.get(f.name)]
    assert not missing, f"{script}: no help text (a trailing # comment) for --{', --'.join(missing)}"


# Command-line tools built with plain argparse: module -> argv that reaches its parse call.
ARGPARSE_CLIS = {"predict_captcha": [], "predict_pair": [], "predict_vqa": [], "stack_pair": [], "fit_smlm": [],
                 "training.runs": ["compare", "runs/x"]}


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parse_args reached")
        self.parser = parser


def _flags_without_help(parser: argparse.ArgumentParser) -> list[str]:
    """Every action (subcommands included, -h excepted) whose help is missing, suppressed or blank."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if not (choice.help or "").strip():
                    missing.append(choice.dest)
            for name, sub in action.choices.items():
                missing += [f"{name} {flag}" for flag in _flags_without_help(sub)]
            continue
        if action.help is argparse.SUPPRESS or not (action.help or "").strip():
            missing.append(action.option_strings[0] if action.option_strings else action.dest)
    return missing


def test_flag_help_check_finds_a_flag_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documented", help="what it does")
    parser.add_argument("--bare")
    parser.add_argument("--blank", help="  ")
    sub = parser.add_subparsers().add_parser("cmd", help="a command")
    sub.add_argument("--inner")
    assert _flags_without_help(parser) == ["--bare", "--blank", "cmd --inner"]


@pytest.mark.parametrize("module", sorted(ARGPARSE_CLIS))
def test_every_flag_of_the_other_clis_has_help_text(module, monkeypatch):
    """main() is run up to its parse call, which raises with the finished parser; nothing else runs."""
    def reached(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", reached)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", reached)
    monkeypatch.setattr(sys, "argv", [module, *ARGPARSE_CLIS[module]])
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(module).main(ARGPARSE_CLIS[module])
    missing = _flags_without_help(parsed.value.parser)
    assert not missing, f"{module}: no help text for {', '.join(missing)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_metric_keys_follow_design(script):
    """train/* and perf/* come from TrainMeter.write (its keys: test_training_helpers); the script names val/*,
    and val_ema/* when it keeps an EMA; no other namespaces."""
    source = (ROOT / script).read_text()
    assert 'f"val/{' in source or '"val/' in source, f"{script}: no val/<metric> keys"
    if "ModelEmaV3" in source:
        assert 'f"val_ema/{' in source, f"{script}: keeps an EMA but logs no val_ema/<metric>"
    for forbidden in ('"train_loss', '"val_loss', '"eval/'):
        assert forbidden not in source, f"{script}: {forbidden}"


def _imported_modules(path: Path) -> dict[str, set[str]]:
    """module -> names imported from it (``import x`` gives an empty set)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
    return found


def test_predict_fit_and_stack_scripts_import_no_training_script():
    users = [*ROOT.glob("predict_*.py"), *ROOT.glob("fit_*.py"), *ROOT.glob("stack_*.py")]
    assert len(users) >= 4
    for path in users:
        train = [m for m in _imported_modules(path) if m.startswith("train_")]
        assert not train, f"{path.name} imports {train}: load models with training.export.load_export instead"


def test_benchmarks_import_a_training_script_only_for_its_train_step():
    """A benchmark that imports a train script times its train_step, directly or through a *_step benchmark."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        imported = _imported_modules(path)
        times_step = any(m.startswith("benchmarks.") and m.endswith("_step") for m in imported)
        for module, names in imported.items():
            if module.startswith("train_"):
                assert "train_step" in names or times_step, \
                    f"benchmarks/{path.name} imports {module} without timing its train_step"


def test_library_modules_import_no_script_and_no_accelerate():
    for folder in ("models", "losses", "data", "metrics"):
        for path in (ROOT / folder).rglob("*.py"):
            for module in _imported_modules(path):
                top = module.split(".")[0]
                assert not top.startswith(("train_", "predict_", "fit_", "stack_")), f"{path}: imports {module}"
                assert top not in ("accelerate", "training", "wandb"), f"{path}: imports {module}"
