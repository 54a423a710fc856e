"""Reading a text file a user named (a config, a preset, a dataset's annotations), and checking text a
user typed.

Why: such a file may be missing, a directory, unreadable or not UTF-8; each case must reach the user
as one error of the caller's kind naming the path, never a `UnicodeDecodeError` traceback. One reader
keeps the messages the same for configs, presets and datasets. Typed text (a prompt, a question on the
command line) can hold a lone surrogate (Python's stand-in for command-line bytes that are not UTF-8);
the tokenizer and the terminal both fail on it, so it is refused as soon as it arrives.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DBTrimKVError

_SURROGATE = re.compile("[\ud800-\udfff]")


def read_utf8(path: Path, error: type[DBTrimKVError]) -> str:
    """The file's text; `error` naming the path when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None


def check_unicode(text: str, what: str, error: type[DBTrimKVError]) -> str:
    """`text` unchanged; `error` naming `what` when it holds a lone surrogate (it is not valid Unicode)."""
    found = _SURROGATE.search(text)
    if found is not None:
        raise error(f"{what} is not valid Unicode text: a lone surrogate U+{ord(found.group(0)):04X} at "
                    f"character {found.start()} (on a command line: bytes that are not UTF-8)")
    return text
