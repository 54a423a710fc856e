"""Stop strings: end a row's generation as soon as its decoded text contains one of them.

Why: evaluation harnesses (lmms-eval's `until`) and the OpenAI API (`stop`) end an answer at a
string, not a token: a stop string may span several tokens or end inside one. Checking the decoded
text after every token stops the row when it happens (no tokens wasted after it), and the answer is
cut as OpenAI and vLLM cut it: the text ends just before the earliest stop string (which is not
included); the token ids end with the token that completed it.

`StopStrings` is a predicate over one row's generated ids (`done(ids) -> bool`), so any decode loop
can ask it after each token, one row at a time, and a batch whose rows stop at different steps is
no special case (the model runner's decode loop takes it as a row's `done`). Each check decodes the
row's ids so far, as the server's streaming detokenizer does (`serving/detokenize.py`, which also
holds back text that may still grow into a stop string; this module serves whole answers).
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


class StopStrings:
    """Whether a row's generated ids spell out a stop string, and the row's answer cut before it."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stops = tokenizer, stop_strings(stop)

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __call__(self, ids: Sequence[int]) -> bool:
        """True once the text of `ids` (a row's generated ids so far) contains a stop string."""
        return bool(self.stops) and first_stop(self.text(ids), self.stops) is not None

    def cut(self, ids: Sequence[int]) -> tuple[list[int], str]:
        """(the ids up to the token that completed the first stop string, the text before that string);
        ids and their whole text when no stop string appears."""
        ids = list(ids)
        if not self(ids):
            return ids, self.text(ids)
        low, high = 1, len(ids)  # the shortest prefix that holds a stop string (text only grows with it)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if self(ids[:middle]) else (middle + 1, high)
        text = self.text(ids[:low])
        return ids[:low], text[: first_stop(text, self.stops)]
