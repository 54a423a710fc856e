"""A row's text: its generated ids decoded as they come, released piece by piece, cut at the first
stop string.

Why: one rule for the text of an answer on every path. The pipeline (whole answers, streamed or
not, `stop=`), the evaluation harnesses (lmms-eval's `until`) and the server (OpenAI `stop`,
server-sent pieces) all end a row as soon as its text holds a stop string, and cut it as OpenAI and
vLLM cut it: the text ends just before the earliest stop string (`stop_strings.first_stop`), the ids
with the token that completed it. Streamed pieces concatenate to that text, never hold a half
character (a multi-byte character split over tokens) nor the beginning of a stop string that may
still complete. Each token decodes only a window of the last few ids (vLLM's incremental
detokenization: the text of ids[prefix:] past that of ids[prefix:read]), not the whole answer again:
decoding every id at every token made a 4096-token answer cost time quadratic in its length.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

from ..stop_strings import first_stop


class TextTracker:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # text so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False
        self._hold = 0  # characters at the end of `text` that may still grow into a stop string
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
        self._update()
        return self.take()

    def done(self, ids: Sequence[int]) -> bool:
        """A decode row's `done` predicate (`runner.decode.DecodeRow`): whether the text of `ids` (the row's
        generated ids so far, of which the tracker may have been given the first ones with `add`)
        reached a stop string. A tracker follows one row: ids that do not continue its own are an error."""
        known = len(self.ids)
        if len(ids) < known or (known and ids[known - 1] != self.ids[-1]):
            raise ValueError("a TextTracker follows one row's ids: give each row a tracker of its own")
        if len(ids) > known:
            self.ids.extend(ids[len(self.ids) :])
            self._update()
        return self.stopped

    def take(self) -> str:
        """The text released since the last call (all but a suffix that may still grow into a stop string)."""
        return self._release(len(self.text) - self._hold)

    def flush(self) -> str:
        """Everything not yet released (at the end of generation), a trailing half character included."""
        if not self.stopped:
            self.text, self._hold = self._advance(final=True), 0
        return self._release(len(self.text))

    def _update(self) -> None:
        full = self._advance()
        # the text so far held no stop string, so a new one ends in what was added: search only from there
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        at = first_stop(full[start:], self.stop)
        if at is not None:
            full, self.stopped = full[: start + at], True
        self.text, self._hold = full, 0
        if not self.stopped:
            for stop in self.stop:  # a suffix that could grow into a stop string waits
                self._hold = max(self._hold, next((k for k in range(min(len(stop) - 1, len(full)), 0, -1)
                                                   if full.endswith(stop[:k])), 0))

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


class TextStream:
    """A streamer for `dbtrimkv.generate(streamer=...)` (transformers' `put` / `end`) over one row's
    `TextTracker`, iterated for its text pieces: a stop string is never streamed, and the row's `done`
    may be the same tracker's (whichever of the two sees a token first decodes it)."""

    def __init__(self, tracker: TextTracker):
        self.tracker, self._ids, self._prompt_seen = tracker, [], False
        self._pieces: queue.Queue = queue.Queue()

    def put(self, value) -> None:
        if not self._prompt_seen:  # the prompt's ids come first: they are not the answer
            self._prompt_seen = True
            return
        self._ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.tracker.done(self._ids)
        piece = self.tracker.take()
        if piece:
            self._pieces.put(piece)

    def end(self) -> None:
        piece = self.tracker.flush()
        if piece:
            self._pieces.put(piece)
        self._pieces.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
