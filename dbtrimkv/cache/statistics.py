"""`CacheStatistics`: what a `DBTrimKVCache` reports about its sequences (entries, bytes, positions
and modalities kept), read from its store and attention backend.

Why: reports (`GenerationStats`, the server's gauges, the benchmarks, the tests) read these; they
are a role of their own, apart from the transformers adapter that drives forwards and evictions.
The adapter inherits them; every method only reads `self.store` / `self.backend`.
"""

from __future__ import annotations

import torch


class CacheStatistics:
    """Read-only reports of a cache; mixed into `DBTrimKVCache`."""

    @property
    def batch_size(self) -> int:
        return len(self.requests) if len(self.requests) else -1

    @property
    def segments_per_sequence(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def seen(self) -> list[int]:
        """Real tokens seen per sequence (a copy of the request table's column)."""
        return self.requests.column("seen")

    @property
    def peak_entries(self) -> list[int]:
        """Most entries each sequence has held at once (a copy of the request table's column)."""
        return self.requests.column("peak_entries")

    def views_bytes(self) -> int:
        """Bytes of the CPU attention views (0 where the kernels read the pool in place)."""
        return self.backend.views_bytes()

    def num_entries(self, batch_index: int = 0) -> int:
        """Entries currently cached for a sequence, over all layers and KV heads."""
        return int(self.requests[batch_index].entries) if self.store.pool is not None else 0

    def storage_bytes(self) -> int:
        """Bytes of the allocated K/V pool."""
        return self.store.pool.storage_bytes() if self.store.pool is not None else 0

    def full_cache_entries(self, batch_index: int = 0) -> int:
        """Entries a full (never evicting) cache would hold for this sequence."""
        return self.requests[batch_index].seen * self.segments_per_sequence if self.store.pool is not None else 0

    def entry_bytes(self) -> int:
        """Bytes of K + V of one entry."""
        return 2 * self.head_dim * (self.store.pool.k.element_size() if self.store.pool is not None else 2)

    def _segment_ids(self, batch_index: int) -> range:
        return self.store.segment_ids(batch_index)

    def retained_positions(self, batch_index: int = 0) -> list[list[torch.Tensor]]:
        """Per layer, per KV head: sorted positions still cached (LongTensor on CPU)."""
        return self.store.retained_positions(batch_index)

    def retained_slots(self, batch_index: int = 0) -> torch.Tensor:
        """Slot ids of every cached entry of a sequence."""
        return self.store.retained_slots(batch_index)

    def retained_by_modality(self, batch_index: int = 0) -> dict[str, int]:
        """Cached entries of a sequence by modality of their token: text / image / video."""
        return self.store.retained_by_modality(batch_index)

    def retained_per_head(self, batch_index: int = 0) -> torch.Tensor:
        """Entries cached per (layer, KV head): `[L, H]`."""
        return self.store.retained_per_head(batch_index)
