"""`EvictionTrigger`: when a cache evicts, and the count of what it evicted.

Why: the eviction contract (docs/architecture.md) is lazy: just before a forward that adds `n`
tokens would take sequence b past `budget + L*H*max(buffer_size, n)` entries, b is cut to exactly
`budget`; the threshold policy also evicts every `buffer_size` tokens. This object alone applies
that rule and the pool bound that follows from it; the policy decides what goes (from its
read-only view) and the store carries it out.
"""

from __future__ import annotations

import torch

from ..settings.config import DBTrimKVConfig
from ..policies.base import EvictionPolicy
from .store import KVStore, StoreView


class EvictionTrigger:
    def __init__(self, config: DBTrimKVConfig, policy: EvictionPolicy, budget: int | None, store: KVStore,
                 counts: tuple[int, int] = (0, 0)):
        self.config, self.policy, self.budget, self.store = config, policy, budget, store
        self.view = StoreView(store, budget, config.lookahead, config.min_per_head)  # what the policy reads
        self.num_evictions, self.evicted_entries = counts

    def restore_counts(self, num_evictions: int, evicted_entries: int) -> None:
        """A saved cache's eviction counts, read back (`DBTrimKVCache.restore_counters`)."""
        self.num_evictions, self.evicted_entries = num_evictions, evicted_entries

    def bound(self, n: int) -> int | None:
        """Most entries a sequence may hold during a forward that adds n tokens."""
        if self.budget is None:
            return None
        return self.budget + self.store.segments_per_sequence * max(self.config.buffer_size, n)

    def pool_limit(self, counts: list[int]) -> int | None:
        """Most slots the pool may hold during a forward adding `counts[b]` tokens to sequence b."""
        return None if self.budget is None else sum(self.bound(n) for n in counts)

    @property
    def evicts(self) -> bool:
        """Whether this cache ever evicts: it has a budget, or its policy drops entries by a rule of its
        own (threshold's tau, which applies without a budget too)."""
        return self.budget is not None or self.policy.periodic

    def due(self, counts: list[int]) -> list[int]:
        """The sequences to evict before a forward adding `counts[b]` tokens to sequence b."""
        if not self.evicts:
            return []
        lh = self.store.segments_per_sequence
        return [
            b for b, (row, n) in enumerate(zip(self.store.requests, counts))
            if row.entries > 0 and (
                (self.budget is not None and row.entries + n * lh > self.bound(n))
                or (self.policy.periodic and row.since_eviction >= max(self.config.buffer_size, 1))
            )
        ]

    @torch.no_grad()
    def evict(self, sequences: list[int]) -> int:
        """Ask the policy for its order on `sequences` and have the store carry it out."""
        evicted = self.store.evict(self.policy.plan_eviction(self.view, sequences), sequences)
        self.num_evictions += 1
        self.evicted_entries += evicted
        return evicted
