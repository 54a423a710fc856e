"""`RequestTable`: the per-sequence bookkeeping of a cache, one row per sequence.

Why: the cache needs, for every sequence it holds, how many tokens it has seen, how many entries
it caches now and at most, how many tokens arrived since its last eviction, and how far Qwen-VL's
M-RoPE positions run ahead of its text positions. Keeping them as one row per sequence (instead
of parallel lists) lets a server add a sequence to a live cache or retire one without touching
the others' rows, and lets `clone()` / `reset()` copy or clear all of it in one step.
Row `b` is the sequence whose segments are `b * L * H ... (b + 1) * L * H - 1` in the slot tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SequenceState:
    """Bookkeeping of one sequence in the cache."""

    seen: int = 0  # real (non-padding) tokens processed
    entries: int = 0  # entries cached now, over all layers and KV heads
    since_eviction: int = 0  # tokens processed since the last eviction of this sequence
    peak_entries: int = 0  # most entries held at once
    rope_delta: int = 0  # M-RoPE position of the next token minus its text position (Qwen-VL)
    pending: tuple[int, ...] = ()  # ids sampled but never fed (a reply's last token): its next input starts with them


@dataclass
class ParkedSequence:
    """A sequence taken out of a cache whose entries stay allocated in the pool (a server's parked
    session, or a row moving to another cache on the same pool): its bookkeeping and slot ids."""

    state: SequenceState
    slots: torch.Tensor  # slot ids of its L*H segments, concatenated in segment order
    lengths: torch.Tensor  # int64 [L*H]: ids per segment

    @property
    def num_slots(self) -> int:
        return int(self.slots.numel())


class RequestTable:
    """The rows of every sequence a cache holds, in segment order."""

    def __init__(self, rows: list[SequenceState] | None = None):
        self.rows: list[SequenceState] = list(rows) if rows is not None else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> SequenceState:
        return self.rows[index]

    def __iter__(self):
        return iter(self.rows)

    def add(self, state: SequenceState | None = None) -> int:
        """Append a row (a fresh sequence by default); returns its index."""
        self.rows.append(state if state is not None else SequenceState())
        return len(self.rows) - 1

    def remove(self, index: int) -> SequenceState:
        """Drop row `index`; the rows after it move up by one. Returns the removed row."""
        return self.rows.pop(index)

    def clear(self) -> None:
        self.rows.clear()

    def clone(self) -> "RequestTable":
        return RequestTable([replace(row) for row in self.rows])

    def column(self, name: str) -> list[int]:
        """One field of every row, e.g. `column("seen")`."""
        return [getattr(row, name) for row in self.rows]

    def seen_tensor(self, device=None) -> torch.Tensor:
        """Tokens seen per sequence as an int64 tensor (what eviction scores are relative to)."""
        return torch.tensor(self.column("seen"), dtype=torch.int64, device=device)

    def record_forward(self, counts: list[int], segments_per_sequence: int) -> None:
        """Account for a forward that appends `counts[b]` tokens to sequence b (in every segment)."""
        for row, n in zip(self.rows, counts):
            row.seen += n
            row.entries += n * segments_per_sequence
            row.since_eviction += n
            row.peak_entries = max(row.peak_entries, row.entries)

    def record_eviction(self, evicted: list[int], entries: list[int]) -> None:
        """After an eviction: `entries[b]` is what the slot tables now hold for every sequence; the
        sequences in `evicted` start counting tokens since their eviction afresh."""
        for row, n in zip(self.rows, entries):
            row.entries = int(n)
        for b in evicted:
            self.rows[b].since_eviction = 0
