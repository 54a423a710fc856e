"""The policy interface and registry.

A policy decides which entries of a sequence survive when the cache shrinks it to its budget.
Groups are contiguous runs of segments (segment id `(b * L + l) * H + h`) that share a keep
count: the whole sequence, one layer, or one head. The default `evict` scores entries with the
retention rule and runs the select-and-compact kernel; a policy that ranks by something else
overrides `evict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..kernels import select_and_compact, select_and_compact_by_score

if TYPE_CHECKING:
    from ..cache import DBTrimKVCache

_REGISTRY: dict[str, type["EvictionPolicy"]] = {}

NO_LIMIT = torch.iinfo(torch.int64).max // 4


def register_policy(cls):
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str) -> "EvictionPolicy":
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]()


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class EvictionPolicy:
    """Base policy: rank by retention score inside groups of `group_size` segments."""

    name = "base"
    needs_gates = True  # ranks by learned retention scores
    periodic = False  # also evict every `buffer_size` tokens, not only when over the bound

    def group_size(self, num_layers: int, num_kv_heads: int) -> int:
        return num_layers * num_kv_heads

    def keep_counts(self, budget: int, num_layers: int, num_kv_heads: int) -> list[int]:
        """Keep count of each group of one sequence."""
        groups = num_layers * num_kv_heads // self.group_size(num_layers, num_kv_heads)
        return split_evenly(budget, groups)

    def check_budget(self, budget: int, num_layers: int, num_kv_heads: int) -> None:
        """Raise ConfigError if `budget` cannot work for this policy."""

    def min_score(self, cache: "DBTrimKVCache") -> float | None:
        return None

    @torch.no_grad()
    def evict(self, cache: "DBTrimKVCache", sequences: list[int]) -> int:
        """Shrink each listed sequence to its budget; returns the number of entries evicted."""
        keep = self.keep_tensor(cache, sequences)
        t = cache.tables
        return select_and_compact(
            cache.pool.log_beta, cache.pool.pos, t.table, t.seg_start, t.seg_len, cache.pool.free_slots,
            cache.pool.free_top, cache.requests.seen_tensor(cache.device), keep,
            group_size=self.group_size(cache.num_layers, cache.num_kv_heads),
            segs_per_seq=cache.num_layers * cache.num_kv_heads,
            lookahead=cache.config.lookahead, floor=cache.config.min_per_head, min_score=self.min_score(cache),
        )

    @torch.no_grad()
    def evict_by_slot_scores(self, cache: "DBTrimKVCache", sequences: list[int], slot_scores: torch.Tensor) -> int:
        """Evict like `evict`, but rank entries by a score per pool slot (higher stays) computed by the
        policy itself; same groups, tie-break, floor and compaction. For policies that do not rank by
        learned retention (e.g. recency, attention statistics, key norms)."""
        t = cache.tables
        return select_and_compact_by_score(
            slot_scores, cache.pool.pos, t.table, t.seg_start, t.seg_len, cache.pool.free_slots, cache.pool.free_top,
            self.keep_tensor(cache, sequences), self.group_size(cache.num_layers, cache.num_kv_heads),
            cache.config.min_per_head,
        )

    def observe_attention(self, cache: "DBTrimKVCache", layer_idx: int, query: torch.Tensor) -> None:
        """Called before each layer attends (queries `[B, Hq, T, D]`); policies that score entries by
        attention statistics accumulate them here. Default: nothing."""

    def keep_tensor(self, cache: "DBTrimKVCache", sequences: list[int]) -> torch.Tensor:
        """Per-group keep counts for the whole batch; sequences not listed keep everything."""
        per_seq = self.keep_counts(cache.budget, cache.num_layers, cache.num_kv_heads)
        keep = torch.full((cache.batch_size, len(per_seq)), NO_LIMIT, dtype=torch.int64)
        keep[sequences] = torch.tensor(per_seq, dtype=torch.int64)
        return keep.flatten().to(cache.device)
