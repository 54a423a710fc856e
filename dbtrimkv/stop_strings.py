"""Stop strings: what a valid `stop` is, and where the earliest stop string in a text begins.

Why: evaluation harnesses (lmms-eval's `until`) and the OpenAI API (`stop`) end an answer at a
string, not a token: a stop string may span several tokens or end inside one. A row's text is
decoded as it grows and checked after every token by `runner.text.TextTracker` (the row's `done`
predicate, on every path), so the row stops when the string appears, and its answer is cut as
OpenAI and vLLM cut it: just before the earliest stop string (`first_stop`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError


def stop_strings(stop) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (None: none); `ConfigError` for anything else."""
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, (list, tuple)) or not all(isinstance(s, str) and s for s in values):
        raise ConfigError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return tuple(values)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins (None: no stop string in it)."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None
