"""Rows of a live `DBTrimKVCache` on a shared slot pool: attach and detach a sequence at any time.

Why: a server's batch changes at every token boundary (requests join, finish, disconnect), so a
sequence must enter and leave a running cache without rebuilding it, and its KV must never be
copied to do so. Every serving cache draws its slots from one `SlotPool` sized once at start-up;
a sequence's state is its per-segment slot ids plus its counters (seen, entries, since eviction,
peak, M-RoPE delta). `detach_row` takes a row out of a cache *keeping its slots allocated* (a
parked session, or a move to another cache); `attach_row` puts such a state, or an empty one, back
as the last row; `free_row` returns a detached row's slots to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import DBTrimKVCache
from ..cache.pool import SlotPool
from ..config import DBTrimKVConfig

_COUNTERS = ("seen", "entries", "since_eviction", "peak_entries", "rope_deltas")


@dataclass
class RowState:
    """A sequence outside any cache: slot ids of each segment (in position order) and its counters."""

    slots: torch.Tensor  # int32, the segments' ids concatenated
    lengths: torch.Tensor  # int64 [L*H], ids per segment
    seen: int = 0
    entries: int = 0
    since_eviction: int = 0
    peak_entries: int = 0
    rope_deltas: int = 0

    @classmethod
    def empty(cls, segments: int, device) -> "RowState":
        return cls(torch.empty(0, dtype=torch.int32, device=device), torch.zeros(segments, dtype=torch.int64, device=device))

    @property
    def num_slots(self) -> int:
        return int(self.slots.numel())


def shared_pool(head_dim: int, dtype: torch.dtype, device, num_slots: int) -> SlotPool:
    """A pool with all `num_slots` slots allocated now; it never grows afterwards."""
    pool = SlotPool(head_dim, dtype, torch.device(device))
    pool.ensure_free(num_slots, limit=num_slots)
    return pool


def serving_cache(model, config: DBTrimKVConfig, pool: SlotPool) -> DBTrimKVCache:
    """An empty cache (zero rows) whose entries live in `pool`."""
    cache = DBTrimKVCache(model, config)
    cache._initialize(0, pool.device, pool.dtype)
    cache.pool = pool
    return cache


def attach_row(cache: DBTrimKVCache, state: RowState) -> int:
    """Append `state` as the cache's last row (its slots become the row's entries); returns its index."""
    tables = cache.tables
    lengths = state.lengths.to(tables.device)
    start = tables.table.numel() + torch.cumsum(lengths, 0) - lengths
    tables.table = torch.cat([tables.table, state.slots.to(tables.device, torch.int32)])
    tables.seg_start = torch.cat([tables.seg_start, start])
    tables.seg_len = torch.cat([tables.seg_len, lengths.to(torch.int32)])
    tables.seg_cap = torch.cat([tables.seg_cap, lengths])
    tables.num_segments += lengths.numel()
    for name in _COUNTERS:
        getattr(cache, name).append(getattr(state, name))
    cache._batch_size += 1
    return cache._batch_size - 1


def detach_row(cache: DBTrimKVCache, row: int) -> RowState:
    """Remove row `row` (later rows move up by one); its slots stay allocated in the returned state."""
    tables, per_row = cache.tables, cache.segments_per_sequence
    first, last = row * per_row, (row + 1) * per_row
    lengths = tables.seg_len[first:last].to(torch.int64)
    width = int(lengths.max()) if lengths.numel() else 0
    index = tables.seg_start[first:last, None] + torch.arange(width, device=tables.device)
    valid = torch.arange(index.shape[1], device=tables.device) < lengths[:, None]
    slots = tables.table[index[valid]] if index.numel() else torch.empty(0, dtype=torch.int32, device=tables.device)
    state = RowState(slots.clone(), lengths.clone(), **{name: getattr(cache, name)[row] for name in _COUNTERS})
    keep = torch.ones(tables.num_segments, dtype=torch.bool, device=tables.device)
    keep[first:last] = False
    tables.seg_start, tables.seg_len, tables.seg_cap = tables.seg_start[keep], tables.seg_len[keep], tables.seg_cap[keep]
    tables.num_segments -= per_row
    for name in _COUNTERS:
        del getattr(cache, name)[row]
    cache._batch_size -= 1
    return state


def free_row(pool: SlotPool, state: RowState) -> None:
    """Give a detached row's slots back to the pool's free stack."""
    count = state.num_slots
    if count:
        pool.free_slots[pool.num_free : pool.num_free + count] = state.slots.to(pool.free_slots.device)
        pool.num_free += count
        pool.free_top.fill_(pool.num_free)
    state.slots = state.slots[:0]
    state.lengths = torch.zeros_like(state.lengths)


def slots_in_use(pool: SlotPool) -> int:
    return pool.capacity - pool.num_free
