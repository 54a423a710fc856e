"""Text of a growing token sequence, released piece by piece, cut at the first stop string.

Why: streamed pieces must concatenate to the final text, never contain a half character (a
multi-byte character split over tokens) nor the beginning of a stop string that may still complete.
Where a stop string begins is `stop_strings.first_stop`, as for whole answers. Each token decodes
only a window of the last few ids (vLLM's incremental detokenization: the text of ids[prefix:] past
that of ids[prefix:read]), not the whole answer again: decoding all ids at every token made a
4096-token answer cost the engine thread time quadratic in its length.
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
        self._decoded = ""  # text of ids[:read], whole characters only
        self._prefix, self._read, self._prefix_text = 0, 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool = False) -> str:
        """The text of every id so far: the window ids[prefix:] is decoded, and what it adds past the
        text of ids[prefix:read] is kept once it ends in a whole character (`final`: whatever it is)."""
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(self._prefix_text) and (final or not window.endswith("\ufffd")):
            self._decoded += window[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return self._decoded

    def add(self, token: int) -> str:
        """Add a generated token; returns the newly releasable text."""
        self.ids.append(token)
        full = self._advance()
        hold = 0
        at = first_stop(full, self.stop)
        if at is not None:
            full, self.stopped = full[:at], True
        self.text = full
        if not self.stopped:
            for stop in self.stop:  # a suffix that could grow into a stop string waits
                hold = max(hold, next((k for k in range(min(len(stop) - 1, len(full)), 0, -1)
                                       if full.endswith(stop[:k])), 0))
        return self._release(len(full) - hold)

    def done(self, ids: list[int]) -> bool:
        """A decode row's `done` predicate (`runner.decode.DecodeRow`): whether the answer's text reached a
        stop string (`ids`: the row's generated ids, whose text tokens `add` was given first)."""
        return self.stopped

    def flush(self) -> str:
        """Everything not yet released (at the end of generation), a trailing half character included."""
        if not self.stopped:
            self.text = self._advance(final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece
