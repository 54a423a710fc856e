"""`KVStore`: what a cache holds between forwards: the slot pool, the slot tables and the request
table, and every operation that changes them.

Why: one owner for the stored entries. The store alone takes slots from the pool and gives them
back (the free list is its pool's), appends new entries to the segment tables, carries out a
policy's `EvictionOrder`, and adds, parks and removes sequences (one request-table row and its
`L * H` segments each), and it fills in the `log beta` of entries whose gates were deferred
(`deferred_gates.py`) before anything reads it: an eviction (the kernels), a policy reading its
`StoreView.log_beta`, a sequence leaving, a clone. The transformers adapter (`cache.py`) decides when;
the attention backend (`backend.py`) reads the pool and tables; policies read them through a `StoreView` (a
`policies.view.PolicyView`) and never write them. Layout: docs/architecture.md, "Storage".
"""

from __future__ import annotations

import torch

from ..kernels import select_and_compact, select_and_compact_by_score
from ..inputs.modality import MODALITY_NAMES
from ..policies.base import EvictionOrder
from .deferred_gates import DeferredGates
from .forward_plan import ForwardPlan
from .pool import SlotPool
from .requests import ParkedSequence, RequestTable
from .tables import SlotTables


class KVStore:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, settings=None):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.settings = settings  # the cache's `DBTrimKVConfig` (its calibration; None: none)
        self.gates = DeferredGates(settings)  # runs the gates; decode entries whose log beta is not computed yet
        self.pool: SlotPool | None = None
        self.tables: SlotTables | None = None
        self.requests = RequestTable()  # one row per sequence, in segment order
        self.device = None
        self._offsets: torch.Tensor | None = None  # `_layer_head_offsets`, made on first use

    @property
    def segments_per_sequence(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def ready(self) -> bool:
        """Whether the pool exists (after the first forward or `use_pool`)."""
        return self.pool is not None

    def initialize(self, batch_size: int, device, dtype, pool: SlotPool | None = None) -> None:
        """Create the pool (or adopt a shared one) and the tables, with `batch_size` fresh sequences if
        the request table has none yet."""
        if not len(self.requests):
            for _ in range(batch_size):
                self.requests.add()
        self.device = device if pool is None else pool.device
        self.pool = pool if pool is not None else SlotPool(self.head_dim, dtype, device)
        self.tables = SlotTables(len(self.requests) * self.segments_per_sequence, self.device)

    # --- sequences ------------------------------------------------------------------------------
    def add_sequence(self, parked: ParkedSequence | None = None) -> int:
        row = self.requests.add(parked.state if parked is not None else None)
        if self.tables is not None:
            if parked is None:
                self.tables.add_segments(self.segments_per_sequence)
            else:
                self.tables.add_segments(self.segments_per_sequence, parked.slots, parked.lengths)
        return row

    def park_sequence(self, row: int) -> ParkedSequence:
        if not 0 <= row < len(self.requests):
            raise IndexError(f"row {row} out of range for a cache of {len(self.requests)} sequences")
        self.complete_log_beta()  # (its entries may go to another cache, or their slots back to the pool)
        lh = self.segments_per_sequence
        if self.tables is not None:
            lengths = self.tables.seg_len[row * lh : (row + 1) * lh].to(torch.int64)
            slots = self.tables.remove_segments(row * lh, lh)
        else:
            lengths, slots = torch.zeros(lh, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        return ParkedSequence(self.requests.remove(row), slots, lengths)

    def release(self, parked: ParkedSequence) -> None:
        """Give a parked sequence's slots back to the free list."""
        if self.pool is not None:
            self.pool.release(parked.slots)

    def reclaim(self, in_use: list[torch.Tensor]) -> int:
        """Make every pool slot not listed in `in_use` free again: a server's shared pool after a forward
        failed halfway and left slots in no table (`serving/stepper.py`). Returns how many came back."""
        pool = self.pool
        held = torch.zeros(pool.capacity, dtype=torch.bool, device=pool.device)
        for slots in in_use:
            held[slots.to(device=pool.device, dtype=torch.long)] = True
        free = torch.nonzero(~held).flatten().flip(0)  # the lowest ids on top, handed out first
        lost = free.numel() - pool.num_free
        pool.pop(pool.num_free)
        pool.release(free)
        return lost

    def set_rope_delta(self, row: int, delta: int) -> None:
        """Sequence `row`'s M-RoPE position of the next token minus its text position."""
        self.requests[row].rope_delta = int(delta)

    def complete_log_beta(self) -> None:
        """Compute the deferred gates' `log beta` into the pool (`deferred_gates.py`)."""
        if len(self.gates):
            self.gates.write_into(self.pool.log_beta)

    def completed_pool(self) -> SlotPool | None:
        """The pool (None before the first forward) with every entry's `log beta` computed: what a
        reader outside the cache's own forward sees."""
        if self.pool is not None:
            self.complete_log_beta()
        return self.pool

    # --- one forward -----------------------------------------------------------------------------
    def reserve_forward(self, plan: ForwardPlan, counts: list[int], limit: int | None, headroom: int) -> None:
        """Account for a forward adding `counts[b]` real tokens to sequence b in every segment: grow the
        pool (never past `limit`) and make room in the tables (`place_new_entries` then fills them)."""
        lh = self.segments_per_sequence
        self.pool.ensure_free(sum(counts) * lh, limit)
        self.tables.reserve(plan.new_tokens.repeat_interleave(lh), headroom=headroom)
        self.requests.record_forward(counts, lh)

    def place_new_entries(self, plan: ForwardPlan) -> torch.Tensor | None:
        """For every layer at once: take the forward's new entries' slots, write their positions and
        modality and append them to the slot tables. Returns the slots `[L, N, H]` (plan token order;
        None: no real token); each layer's `update` then writes only K/V."""
        layers, heads = self.num_layers, self.num_kv_heads
        n_tok = plan.token_batch.numel()
        if not n_tok:
            return None
        slots = self.pool.pop(layers * n_tok * heads).view(layers, n_tok, heads)
        shape = slots.shape
        self.pool.write_positions(slots.flatten(), plan.token_position[None, :, None].expand(shape).flatten(),
                                  plan.token_modality[None, :, None].expand(shape).flatten())
        segments = plan.token_batch[None, :, None] * self.segments_per_sequence + self._layer_head_offsets()
        self.tables.append(segments.flatten(), plan.token_rank[None, :, None].expand(shape).flatten(),
                           slots.flatten(), plan.new_tokens.repeat_interleave(self.segments_per_sequence))
        return slots

    def _layer_head_offsets(self) -> torch.Tensor:
        """`[L, 1, H]` segment id of (layer l, head h) within a sequence's run, `l * H + h` (made once)."""
        if self._offsets is None:  # the device is fixed once the pool exists
            self._offsets = torch.arange(self.segments_per_sequence, device=self.device).view(
                self.num_layers, 1, self.num_kv_heads)
        return self._offsets

    @torch.no_grad()
    def evict(self, order: EvictionOrder, sequences: list[int]) -> int:
        """Carry out a policy's order: drop the losers from the tables, push their slots on the free
        stack, re-read every row's entry count. Returns entries evicted."""
        self.complete_log_beta()  # (the kernels score log beta; a policy that reads it got completed values from its view)
        pool, t = self.pool, self.tables
        if order.scores is None:
            evicted = select_and_compact(
                pool.log_beta, pool.pos, t.table, t.seg_start, t.seg_len, pool.free_slots, pool.free_top,
                self.requests.seen_tensor(self.device), order.keep, group_size=order.group_size,
                segs_per_seq=self.segments_per_sequence, lookahead=order.lookahead, floor=order.floor,
                min_score=order.min_score,
            )
        else:
            evicted = select_and_compact_by_score(order.scores, pool.pos, t.table, t.seg_start, t.seg_len,
                                                  pool.free_slots, pool.free_top, order.keep, order.group_size,
                                                  order.floor)
        pool.released(evicted)
        # every row is re-read from the tables: a policy may also drop entries of sequences not listed
        self.requests.record_eviction(sequences, t.lengths_per_sequence(self.segments_per_sequence))
        return evicted

    # --- reading ----------------------------------------------------------------------------------
    def segment_ids(self, batch_index: int) -> range:
        if not 0 <= batch_index < max(len(self.requests), 1):
            raise IndexError(f"batch_index {batch_index} out of range for batch size {len(self.requests)}")
        first = batch_index * self.segments_per_sequence
        return range(first, first + self.segments_per_sequence)

    def retained_positions(self, batch_index: int) -> list[list[torch.Tensor]]:
        out = [[torch.empty(0, dtype=torch.long) for _ in range(self.num_kv_heads)] for _ in range(self.num_layers)]
        if self.pool is None:
            return out
        for s in self.segment_ids(batch_index):
            layer, head = divmod(s % self.segments_per_sequence, self.num_kv_heads)
            out[layer][head] = self.pool.pos[self.tables.entries(s)].to(torch.long).cpu()
        return out

    def retained_slots(self, batch_index: int) -> torch.Tensor:
        if self.pool is None:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.tables.entries(s) for s in self.segment_ids(batch_index)])

    def retained_by_modality(self, batch_index: int) -> dict[str, int]:
        if self.pool is None:
            return {name: 0 for name in MODALITY_NAMES}
        codes = self.pool.modality[self.retained_slots(batch_index)].to(torch.int64)
        counts = torch.bincount(codes, minlength=len(MODALITY_NAMES)).tolist()
        return {name: int(counts[i]) for i, name in enumerate(MODALITY_NAMES)}

    def retained_per_head(self, batch_index: int) -> torch.Tensor:
        if self.pool is None:
            return torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.long)
        lens = self.tables.seg_len[list(self.segment_ids(batch_index))]
        return lens.to(torch.long).view(self.num_layers, self.num_kv_heads).cpu()

    def clone(self) -> "KVStore":
        self.complete_log_beta()
        other = KVStore(self.num_layers, self.num_kv_heads, self.head_dim, self.settings)
        other.device, other.requests = self.device, self.requests.clone()
        if self.pool is not None:
            other.pool, other.tables = self.pool.clone(), self.tables.clone()
        return other


class StoreView:
    """The `policies.view.PolicyView` of a store: per-slot facts, tokens seen, segment layout; read-only."""

    def __init__(self, store: KVStore, budget: int | None, lookahead: int, min_per_head: int):
        self._store = store
        self.num_layers, self.num_kv_heads = store.num_layers, store.num_kv_heads
        self.budget, self.lookahead, self.min_per_head = budget, lookahead, min_per_head

    segments_per_sequence = property(lambda self: self._store.segments_per_sequence)
    batch_size = property(lambda self: len(self._store.requests))
    device = property(lambda self: self._store.device)
    capacity = property(lambda self: self._store.pool.capacity)
    log_beta = property(lambda self: self._store.completed_pool().log_beta)  # (deferred gates run first)
    positions = property(lambda self: self._store.pool.pos)
    modality = property(lambda self: self._store.pool.modality)
    keys = property(lambda self: self._store.pool.k)

    def seen(self) -> torch.Tensor:
        return self._store.requests.seen_tensor(self._store.device)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._store.tables
        seg, index = tables.enumerate_entries()
        return seg, tables.table[index].to(torch.int64)
