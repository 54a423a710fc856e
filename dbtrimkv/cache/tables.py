"""`SlotTables`: the ordered slot ids of every segment, in CSR form, and the operations on them.

Why: attention and eviction need, per (sequence, layer, KV head) segment, the ids of its slots in
position order. Segments are ragged (the global budget gives some heads far more entries than
others), so they share one flat int32 `table`: segment `s` owns `table[seg_start[s] :
seg_start[s] + seg_cap[s]]` of which the first `seg_len[s]` are used. Eviction compacts a
segment inside its region; when a segment needs more room than it has, every region is laid out
again with fresh headroom (an int32 copy, no K/V bytes move).

Segment ids are `(b * L + l) * H + h`, so a sequence owns one contiguous run of `L * H` segments;
`add_segments` / `remove_segments` grow or shrink the run list at the end or in the middle
without touching the other segments' regions (a server adds and retires sequences this way).
This module owns the engine's slot-table arithmetic (entry enumeration, padded segment gathers);
the kernels' `naive.py` references spell out their own copy of the layout as part of their
contract.
"""

from __future__ import annotations

import torch


class SlotTables:
    def __init__(self, num_segments: int, device: torch.device):
        self.num_segments = num_segments
        self.device = device
        self.table = torch.empty(0, dtype=torch.int32, device=device)
        self.seg_start = torch.zeros(num_segments, dtype=torch.int64, device=device)
        self.seg_len = torch.zeros(num_segments, dtype=torch.int32, device=device)
        self.seg_cap = torch.zeros(num_segments, dtype=torch.int64, device=device)

    def reserve(self, add: torch.Tensor, headroom: int) -> None:
        """Make room for `add[s]` more ids in every segment; on overflow relayout with `headroom` spare."""
        need = self.seg_len.to(torch.int64) + add
        if bool((need > self.seg_cap).any()):
            self._relayout(need + headroom)

    def _relayout(self, capacity: torch.Tensor) -> None:
        start = torch.cumsum(capacity, 0) - capacity
        table = torch.full((int(capacity.sum()),), -1, dtype=torch.int32, device=self.device)
        seg, index = self.enumerate_entries()
        table[start[seg] + index - self.seg_start[seg]] = self.table[index]
        self.table, self.seg_start, self.seg_cap = table, start, capacity

    def append(self, segments: torch.Tensor, ranks: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Write `slots` at rank `ranks` past the end of `segments`; then grow each length by `counts`."""
        index = self.seg_start[segments] + self.seg_len.to(torch.int64)[segments] + ranks
        self.table[index] = slots.to(torch.int32)
        self.seg_len += counts.to(torch.int32)

    def entries(self, segment: int) -> torch.Tensor:
        """Slot ids of one segment, in position order (int64)."""
        start, length = int(self.seg_start[segment]), int(self.seg_len[segment])
        return self.table[start : start + length].to(torch.int64)

    def enumerate_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment id, index into `table`) of every cached entry, segment by segment in table order."""
        lens = self.seg_len.to(torch.int64)
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
        offset = torch.arange(seg.numel(), device=lens.device) - (torch.cumsum(lens, 0) - lens)[seg]
        return seg, self.seg_start[seg] + offset

    def layer_segments(self, layer: int, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        """Segment ids `[B, H]` of one layer, for every sequence."""
        b = torch.arange(self.num_segments // (num_layers * num_kv_heads), device=self.device)[:, None]
        h = torch.arange(num_kv_heads, device=self.device)[None, :]
        return (b * num_layers + layer) * num_kv_heads + h

    def all_layer_segments(self, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        """Segment ids `[L, B, H]` of every layer, for every sequence (the views' layout)."""
        return torch.arange(self.num_segments, device=self.device).view(-1, num_layers, num_kv_heads).transpose(0, 1)

    def padded_slots(self, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids of the given segments padded to the longest: `[*segments.shape, Lmax]` int64 (0 where
        not valid) and the validity mask."""
        lens = self.seg_len.to(torch.int64)[segments]
        lmax = int(lens.max()) if lens.numel() else 0
        j = torch.arange(lmax, device=self.device)
        valid = j < lens[..., None]
        index = (self.seg_start[segments][..., None] + j).clamp(max=max(self.table.numel() - 1, 0))
        return torch.where(valid, self.table[index].to(torch.int64), 0), valid

    def lengths_per_sequence(self, segments_per_sequence: int) -> list[int]:
        """Entries held by each run of `segments_per_sequence` segments (each sequence)."""
        return self.seg_len.to(torch.int64).view(-1, segments_per_sequence).sum(1).tolist()

    def add_segments(self, count: int, slots: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> None:
        """Append `count` segments: empty (they get room on their first `reserve`), or holding `slots`
        (`lengths[i]` ids for segment i, concatenated in segment order, as `remove_segments` returned them)."""
        if slots is None:
            lengths = torch.zeros(count, dtype=torch.int64, device=self.device)
        lengths = lengths.to(self.device, torch.int64)
        start = self.table.numel() + torch.cumsum(lengths, 0) - lengths
        if slots is not None:
            self.table = torch.cat([self.table, slots.to(self.device, torch.int32)])
        self.seg_start = torch.cat([self.seg_start, start])
        self.seg_len = torch.cat([self.seg_len, lengths.to(self.seg_len.dtype)])
        self.seg_cap = torch.cat([self.seg_cap, lengths])
        self.num_segments += count

    def remove_segments(self, first: int, count: int) -> torch.Tensor:
        """Drop segments `first .. first + count - 1` (later ids move down by `count`); returns the
        slot ids they held, for the pool's free list. The other segments' regions stay where they are."""
        slots = [self.entries(s) for s in range(first, first + count)]
        keep = torch.ones(self.num_segments, dtype=torch.bool, device=self.device)
        keep[first : first + count] = False
        self.seg_start, self.seg_len, self.seg_cap = self.seg_start[keep], self.seg_len[keep], self.seg_cap[keep]
        self.num_segments -= count
        return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64, device=self.device)

    def clone(self) -> "SlotTables":
        other = SlotTables(self.num_segments, self.device)
        other.table, other.seg_start = self.table.clone(), self.seg_start.clone()
        other.seg_len, other.seg_cap = self.seg_len.clone(), self.seg_cap.clone()
        return other
