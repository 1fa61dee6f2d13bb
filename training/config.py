"""Command line from a dataclass: ``--config x.yaml`` sets defaults, the command line wins.

Every field of the task's ``Args`` dataclass becomes a ``--flag``; the trailing
comment on the field's line is its help text. Unknown YAML keys, values of the wrong
type and failed ``__post_init__`` checks end the program with one line naming the
file or flag and what was expected, and exit status 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import types
import typing
from pathlib import Path

import yaml


class UsageError(ValueError):
    """A user mistake (bad flag, file or value): reported in one line, exit status 2."""


def fail(message: str) -> typing.NoReturn:
    """Print one ``prog: error: ...`` line and exit with status 2, before anything is written."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": an unset flag's help says what happens then
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(message)


def _field_help(cls) -> dict[str, str]:
    """Trailing ``# comment`` of each ``name: type = default`` line in the class body."""
    helps = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M):
            helps[m.group(1)] = m.group(2).strip()
    return helps


def _unwrap_optional(tp):
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp, optional: bool, name: str):
    """A function str -> value that raises ``argparse.ArgumentTypeError`` with a clear message."""
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
    base = type(choices[0]) if choices else tp
    if base not in (int, float, str):
        raise TypeError(f"field {name}: unsupported type {tp!r} (use int, float, str, bool, Literal or X | None)")

    def convert(text):
        if optional and isinstance(text, str) and text.lower() in ("none", "null", ""):
            return None
        try:
            value = base(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if base is float and not math.isfinite(value):  # nan passes every `x <= 0` check downstream
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}; got {text!r}")
        return value

    convert.__name__ = base.__name__
    return convert


def _coerce_yaml(value, tp, optional: bool):
    """Check a YAML value against the field type; int -> float is allowed, nothing else is coerced."""
    if value is None:
        if optional:
            return None
        raise ValueError("expected a value, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
    if choices is not None:
        if any(type(value) is type(c) and value == c for c in choices):   # 2.0 or true is not the choice 2 or 1
            return value
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > 1e308:  # float() would overflow
            raise ValueError(f"expected a finite number, got an integer of {len(str(abs(value)))} digits")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected {tp.__name__}, got {value!r}")


def load_yaml_config(path: str | Path, cls, sections: tuple[str, ...] = ()) -> dict:
    """Read a YAML preset and check every key and value against ``cls``'s fields.

    ``sections`` names top-level mappings that belong to someone else (e.g. ``simulation``); they are
    skipped here and must be read by their owner.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for section in sections:
        if section in raw and not isinstance(raw[section], dict):
            raise UsageError(f"{path}: key {section}: expected a mapping (a section of its own)")
    unknown = sorted(set(map(str, raw)) - set(names) - set(sections))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join([*names, *sections])}")
    raw = {k: v for k, v in raw.items() if k not in sections}
    values = {}
    for key, value in raw.items():
        tp, optional = _unwrap_optional(hints[key])
        try:
            values[key] = _coerce_yaml(value, tp, optional)
        except ValueError as e:
            raise UsageError(f"{path}: key {key}: {e}") from None
    return values


def parse_args(cls, argv: list[str] | None = None, sections: tuple[str, ...] = ()):
    """Build the dataclass ``cls`` from YAML defaults (``--config``) and the command line."""
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    parser = _Parser(description=(cls.__doc__ or "").strip() or None,
                     formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        kwargs = {"default": f.default, "help": helps.get(f.name, " ")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(tp, optional, f.name)
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(tp))) + "}" if typing.get_origin(tp) is typing.Literal else None
        parser.add_argument(f"--{f.name}", **kwargs)

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_yaml_config(known.config, cls, sections))
        except UsageError as e:
            fail(str(e))
    namespace = parser.parse_args(argv)
    try:
        return cls(**vars(namespace))
    except (UsageError, ValueError) as e:
        fail(str(e))


def as_dict(args) -> dict:
    """The dataclass as a plain dict (for YAML, trackers and exports)."""
    return dataclasses.asdict(args)
