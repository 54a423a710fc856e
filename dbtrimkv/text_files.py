"""Reading a text file a user named (a config, a preset, a dataset's annotations).

Why: such a file may be missing, a directory, unreadable or not UTF-8; each case must reach the user
as one error of the caller's kind naming the path, never a `UnicodeDecodeError` traceback. One reader
keeps the messages the same for configs, presets and datasets.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DBTrimKVError


def read_utf8(path: Path, error: type[DBTrimKVError]) -> str:
    """The file's text; `error` naming the path when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
