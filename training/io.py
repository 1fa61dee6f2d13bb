"""Output files of the predict/fit/stack scripts: checked before the work, written atomically.

``check_output`` runs before any compute and raises ``UsageError`` (one line naming the flag and the path)
for an output that exists (without ``overwrite``), has the wrong kind (a folder where a file is expected,
or the reverse), or whose folder cannot be created or written. ``write_atomically`` and
``write_folder_atomically`` write ``<name>.tmp`` next to the output and rename it, so an interrupted or
failed run leaves the previous output intact and no partial file under the output's name.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from training.config import UsageError


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_output(path, overwrite: bool, flag: str = "--out", folder: bool = False) -> Path:
    """``path`` as a Path once it is known to be writable; ``UsageError`` otherwise.

    A file output (``folder=False``) must not be a directory and must not exist unless ``overwrite``.
    A folder output may be new or empty; a non-empty one needs ``overwrite``. The nearest existing
    ancestor must be a writable directory (the missing ones are created only when writing)."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a folder; expected a folder name")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise UsageError(f"{flag} {path}: exists and is not empty (pass --overwrite to replace it)")
    else:
        if path.is_dir():
            raise UsageError(f"{flag} {path}: is a directory, expected a file name")
        if path.exists() and not overwrite:
            raise UsageError(f"{flag} {path}: already exists (pass --overwrite to replace it)")
        if _tmp(path).is_dir():
            raise UsageError(f"{flag} {path}: {_tmp(path)} (the temporary file written first) is a directory")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: cannot create its folder, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: folder {parent} is not writable")
    return path


def write_atomically(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` with tmp = ``<path>.tmp``, then rename it onto ``path`` (replacing a file there);
    the temporary file is removed if anything fails, and ``path`` is then untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder_atomically(path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a new empty folder ``<path>.tmp``, then rename it to ``path``. An existing ``path``
    is moved aside to ``<path>.old`` first and deleted only once the new folder is in place (put back if the
    rename fails); the temporary folder is removed if anything fails."""
    path = Path(path)
    tmp, old = _tmp(path), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
