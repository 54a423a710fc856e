"""Check that a command can write its outputs before it does any work, and name default outputs.

Why: a 20-minute evaluation that only then finds `--output /proc/x/y` unwritable loses the run
(and ended in a traceback). Every command that writes files checks each path first: the folder
(or the nearest one that exists, since missing folders are created later) must accept a new file,
which is tried for real with a temporary file that is removed at once (permission bits alone do
not tell, e.g. for root or on /proc); an existing file must be a file and writable. The default
outputs of `dbtrimkv eval` go to the working directory under a name that says what and when
(`timestamped`), never into the project's `bench/`, whose results the README quotes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError


def timestamped(what: str) -> str:
    """`what-YYYYMMDD-HHMMSS` (local time): a default output name that says what and when."""
    return f"{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` if a file can be written there (its folders may be missing); ConfigError naming `flag` otherwise."""
    if not os.fspath(path).strip():
        raise ConfigError(f"{flag} is empty: give a file path")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {flag} {path}: it is a folder, not a file")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
        return path
    _check_folder(path.parent, flag, path)
    return path


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` if files can be written in it (it may not exist yet); ConfigError naming `flag` otherwise."""
    if not os.fspath(path).strip():
        raise ConfigError(f"{flag} is empty: give a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cannot write {flag} {path}: it is a file, not a folder")
    _check_folder(path, flag, path)
    return path


def _check_folder(folder: Path, flag: str, target: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write {flag} {target}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {target}: cannot create files in {existing} "
                          f"({exc.strerror or exc})") from None
