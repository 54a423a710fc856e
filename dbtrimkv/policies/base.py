"""The policy interface and registry.

A policy decides which entries of a sequence survive when the cache shrinks it to its budget.
Groups are contiguous runs of segments (segment id `(b * L + l) * H + h`) that share a keep
count: the whole sequence, one layer, or one head. The default `evict` scores entries with the
retention rule and runs the select-and-compact kernel; a policy that ranks by something else
overrides `evict`.

A policy is a small dataclass whose fields are its options (kvpress style): `get_policy("snapkv",
window=32)` in Python, `policy_options: {window: 32}` in a YAML file, `--policy-option window=32` on
the command line. Each cache builds one instance from its config; state a policy keeps between
calls lives on that instance (`reset()` restores it, `clone()` copies it) or in the cache's typed
`policy_scores` field.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError
from ..kernels import select_and_compact, select_and_compact_by_score

if TYPE_CHECKING:
    from ..cache import DBTrimKVCache
    from ..cache.attention_stats import LayerAttention
    from ..cache.forward_plan import ForwardPlan

_REGISTRY: dict[str, type["EvictionPolicy"]] = {}

NO_LIMIT = torch.iinfo(torch.int64).max // 4


def register_policy(cls):
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type["EvictionPolicy"]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return _REGISTRY[name]


def policy_option_defaults(name: str) -> dict:
    """A policy's options and their defaults."""
    return {f.name: f.default for f in fields(policy_class(name)) if f.init and f.default is not MISSING}


def get_policy(name: str, **options) -> "EvictionPolicy":
    """A new policy instance with the given options (a `ConfigError` names any it does not have)."""
    known = policy_option_defaults(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        have = ", ".join(f"{k} (default {v!r})" for k, v in known.items()) or "none"
        raise ConfigError(f"policy {name!r} has no option {', '.join(map(repr, unknown))}; its options: {have}")
    return policy_class(name)(**options)


def check_int(policy: str, option: str, value, minimum: int) -> None:
    """Raise ConfigError unless `value` is an integer >= `minimum` (shared by the policies' checks)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"policy {policy!r}: {option} must be an integer >= {minimum}, got {value!r}")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class EvictionPolicy:
    """Base policy: rank by retention score inside groups of `group_size` segments."""

    name: ClassVar[str] = "base"
    periodic: ClassVar[bool] = False  # also evict every `buffer_size` tokens (with or without a budget)

    def options(self) -> dict:
        """This instance's options by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def reset(self) -> None:
        """Forget what was learned from earlier calls (`DBTrimKVCache.reset`). Default: nothing kept."""

    def clone(self) -> "EvictionPolicy":
        """An independent copy, state included (`DBTrimKVCache.clone`)."""
        return copy.deepcopy(self)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State beyond the options, as tensors, for a saved cache (`cache/portable.py`). Default: none."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (a `ValueError` for anything else)."""
        if state:
            raise ValueError(f"policy {self.name!r} keeps no state, got {sorted(state)}")

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

    def observed_queries(self, plan: "ForwardPlan") -> torch.Tensor | None:
        """The queries `[B, T]` (bool) of a forward whose attention this policy reads, asked once per
        forward; None (the default) = none, and `observe_attention` is never called."""
        return None

    def observe_attention(self, cache: "DBTrimKVCache", layer_idx: int | None, attention: "LayerAttention") -> None:
        """Called with the attention the cached entries (this forward's new ones included) received
        from the `observed_queries` (`cache.attention_stats.LayerAttention`): at each layer's attention,
        or once per forward for every layer (`layer_idx` None, tensors with a leading layer dimension:
        CPU decode); policies that score entries by attention statistics accumulate them here.
        Default: nothing."""

    def keep_tensor(self, cache: "DBTrimKVCache", sequences: list[int]) -> torch.Tensor:
        """Per-group keep counts for the whole batch; sequences not listed keep everything."""
        groups = cache.segments_per_sequence // self.group_size(cache.num_layers, cache.num_kv_heads)
        keep = torch.full((cache.batch_size, groups), NO_LIMIT, dtype=torch.int64)
        if cache.budget is not None:  # without one only a policy's own rule (threshold's tau) evicts
            keep[sequences] = torch.tensor(self.keep_counts(cache.budget, cache.num_layers, cache.num_kv_heads),
                                           dtype=torch.int64)
        return keep.flatten().to(cache.device)
