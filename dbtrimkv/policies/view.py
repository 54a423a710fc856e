"""What a policy may read of a cache: `PolicyView` (a protocol) and `LayerAttention` (the attention
statistics the cache hands to policies that rank by them).

Why: a policy decides which entries survive; it must not reach into the store that owns the slot
pool, the slot tables and the free list, nor write any of them. It reads per-slot facts (learned
retention, positions, modalities, keys), the tokens each sequence has seen and the segment layout
through this narrow view, and answers with an `EvictionOrder` (`base.py`) that the store carries
out. Defined here, beside the policies, so that the policies never import the cache (the cache
builds on the policies, not the other way round); `dbtrimkv.cache.store.StoreView` implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class PolicyView(Protocol):
    """Read-only facts about one cache's entries (tensors are the store's own: never write them)."""

    num_layers: int
    num_kv_heads: int
    budget: int | None  # entries per sequence, None: no fixed budget
    lookahead: int
    min_per_head: int

    @property
    def segments_per_sequence(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def capacity(self) -> int: ...  # pool slots (per-slot tensors have this length)

    @property
    def log_beta(self) -> torch.Tensor: ...  # [S] float32 learned retention per slot

    @property
    def positions(self) -> torch.Tensor: ...  # [S] int32 logical position per slot

    @property
    def modality(self) -> torch.Tensor: ...  # [S] int8 `Modality` code per slot

    @property
    def keys(self) -> torch.Tensor: ...  # [S, D] cached key per slot

    def seen(self) -> torch.Tensor: ...  # [B] int64 real tokens each sequence has seen

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # (segment id, slot id) of every cached entry


@dataclass(frozen=True)
class LayerAttention:
    """One layer's cached entries, `[B, H, Lmax]` in each segment's table (position) order; or every
    layer's at once, `[L, B, H, Lmax]` (`attention_stats.from_decode_views`)."""

    slots: torch.Tensor  # int64 pool slot ids (0 where not valid)
    valid: torch.Tensor  # bool
    mass: torch.Tensor  # float32 attention received from the counted queries (0 where not valid)
    new_slots: torch.Tensor  # int64 `[N]` slots of the entries this forward cached in the layer(s)
