"""Text of a growing token sequence, released piece by piece, cut at the first stop string.

Why: streamed pieces must concatenate to the final text, never contain a half character (a
multi-byte character split over tokens) nor the beginning of a stop string that may still complete.
Where a stop string begins is `stop_strings.first_stop`, as for whole answers.
"""

from __future__ import annotations

from ..stop_strings import first_stop


class TextTracker:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # text so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a generated token; returns the newly releasable text."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hold = 0
        at = first_stop(full, self.stop)
        if at is not None:
            full, self.stopped = full[:at], True
        self.text = full
        if not self.stopped:
            if full.endswith("\ufffd"):
                hold = 1
            for stop in self.stop:  # a suffix that could grow into a stop string waits
                hold = max(hold, next((k for k in range(min(len(stop) - 1, len(full)), 0, -1)
                                       if full.endswith(stop[:k])), 0))
        return self._release(len(full) - hold)

    def done(self, ids: list[int]) -> bool:
        """A decode row's `done` predicate (`runner.decode.DecodeRow`): whether the answer's text reached a
        stop string (`ids`: the row's generated ids, whose text tokens `add` was given first)."""
        return self.stopped

    def flush(self) -> str:
        """Everything not yet released (at the end of generation)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece
