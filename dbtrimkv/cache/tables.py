"""`SlotTables`: the ordered slot ids of every segment, in CSR form.

Why: attention and eviction need, per (sequence, layer, KV head) segment, the ids of its slots in
position order. Segments are ragged (the global budget gives some heads far more entries than
others), so they share one flat int32 `table`: segment `s` owns `table[seg_start[s] :
seg_start[s] + seg_cap[s]]` of which the first `seg_len[s]` are used. Eviction compacts a
segment inside its region; when a segment needs more room than it has, every region is laid out
again with fresh headroom (an int32 copy, no K/V bytes move).
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
        lens = self.seg_len.to(torch.int64)
        seg = torch.repeat_interleave(torch.arange(self.num_segments, device=self.device), lens)
        offset = torch.arange(seg.numel(), device=self.device) - (torch.cumsum(lens, 0) - lens)[seg]
        table[start[seg] + offset] = self.table[self.seg_start[seg] + offset]
        self.table, self.seg_start, self.seg_cap = table, start, capacity

    def append(self, segments: torch.Tensor, ranks: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Write `slots` at rank `ranks` past the end of `segments`; then grow each length by `counts`."""
        index = self.seg_start[segments] + self.seg_len.to(torch.int64)[segments] + ranks
        self.table[index] = slots.to(torch.int32)
        self.seg_len += counts.to(torch.int32)

    def entries(self, segment: int) -> torch.Tensor:
        start, length = int(self.seg_start[segment]), int(self.seg_len[segment])
        return self.table[start : start + length].to(torch.int64)

    def total_bytes(self) -> int:
        return self.table.numel() * 4 + self.num_segments * (8 + 4 + 8)

    def clone(self) -> "SlotTables":
        other = SlotTables(self.num_segments, self.device)
        other.table, other.seg_start = self.table.clone(), self.seg_start.clone()
        other.seg_len, other.seg_cap = self.seg_len.clone(), self.seg_cap.clone()
        return other
