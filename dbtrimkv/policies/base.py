"""The policy interface and registry.

A policy decides which entries of a sequence survive when the cache shrinks it to its budget.
Groups are contiguous runs of segments (segment id `(b * L + l) * H + h`) that share a keep
count: the whole sequence, one layer, or one head. A policy reads the cache through a narrow
`PolicyView` (`view.py`) and answers `plan_eviction` with an `EvictionOrder`: keep counts per
group and what ranks the entries (the learned retention rule by default, or a score per slot for
a policy that ranks by something else). The cache's store carries the order out with the
select-and-compact kernel; no policy touches the slot tables or the free list.

A policy is a small dataclass whose fields are its options (kvpress style): `get_policy("snapkv",
window=32)` in Python, `policy_options: {window: 32}` in a YAML file, `--policy-option window=32` on
the command line. Each cache builds one instance from its config; state a policy keeps between
calls lives on that instance: `scores`, a value per pool slot (SnapKV, H2O), or fields of its own
(`reset()` restores them, `clone()` copies them).
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import torch

from ..errors import ConfigError
from .view import LayerAttention, PolicyView

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


@dataclass(frozen=True)
class EvictionOrder:
    """A policy's answer to one eviction, carried out by the cache's store: every group of segments
    keeps its `keep` best entries, ranked by `scores` (one per pool slot, higher stays) or, when
    None, by the learned retention rule (`lookahead`, and `min_score`: also drop entries below it)."""

    keep: torch.Tensor  # int64 [B * groups] keep count per group (NO_LIMIT: keep all)
    group_size: int  # segments per group
    floor: int  # entries every segment keeps at least (`min_per_head`)
    scores: torch.Tensor | None = None
    lookahead: int = 1
    min_score: float | None = None


@dataclass
class EvictionPolicy:
    """Base policy: rank by retention score inside groups of `group_size` segments."""

    name: ClassVar[str] = "base"
    periodic: ClassVar[bool] = False  # also evict every `buffer_size` tokens (with or without a budget)
    # float32 value per pool slot kept between calls by policies that accumulate one (SnapKV, H2O)
    scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def options(self) -> dict:
        """This instance's options by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def reset(self) -> None:
        """Forget what was learned from earlier calls (`DBTrimKVCache.reset`)."""
        self.scores = None

    def clone(self) -> "EvictionPolicy":
        """An independent copy, state included (`DBTrimKVCache.clone`)."""
        return copy.deepcopy(self)

    def place_scores(self, slots: torch.Tensor, scores: torch.Tensor, capacity: int) -> None:
        """Put saved per-slot `scores` at `slots` (a saved cache or session read back, `cache/portable.py`),
        growing `scores` to the pool's `capacity`; other slots keep theirs (zero if none)."""
        state = self.scores
        if state is None or state.numel() < capacity:
            grown = torch.zeros(capacity, dtype=torch.float32, device=slots.device)
            if state is not None:
                grown[: state.numel()] = state
            state = grown
        self.scores = state.index_copy_(0, slots, scores.to(state.device, torch.float32))

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

    def min_score(self, view: PolicyView) -> float | None:
        return None

    def plan_eviction(self, view: PolicyView, sequences: list[int]) -> EvictionOrder:
        """How to shrink each listed sequence to its budget (default: by learned retention)."""
        return EvictionOrder(self.keep_tensor(view, sequences), self.group_size(view.num_layers, view.num_kv_heads),
                             view.min_per_head, lookahead=view.lookahead, min_score=self.min_score(view))

    def order_by_slot_scores(self, view: PolicyView, sequences: list[int], slot_scores: torch.Tensor) -> EvictionOrder:
        """Evict like the default, but rank entries by a score per pool slot (higher stays) computed by
        the policy itself; same groups, tie-break, floor and compaction. For policies that do not rank
        by learned retention (e.g. recency, attention statistics, key norms)."""
        return EvictionOrder(self.keep_tensor(view, sequences), self.group_size(view.num_layers, view.num_kv_heads),
                             view.min_per_head, scores=slot_scores)

    def observed_queries(self, plan) -> torch.Tensor | None:
        """The queries `[B, T]` (bool) of a forward whose attention this policy reads, asked once per
        forward with its `cache.forward_plan.ForwardPlan`; None (the default) = none, and
        `observe_attention` is never called."""
        return None

    def observe_attention(self, view: PolicyView, layer_idx: int | None, attention: LayerAttention) -> None:
        """Called with the attention the cached entries (this forward's new ones included) received
        from the `observed_queries` (`LayerAttention`): at each layer's attention,
        or once per forward for every layer (`layer_idx` None, tensors with a leading layer dimension:
        CPU decode); policies that score entries by attention statistics accumulate them here.
        Default: nothing."""

    def keep_tensor(self, view: PolicyView, sequences: list[int]) -> torch.Tensor:
        """Per-group keep counts for the whole batch; sequences not listed keep everything."""
        groups = view.segments_per_sequence // self.group_size(view.num_layers, view.num_kv_heads)
        keep = torch.full((view.batch_size, groups), NO_LIMIT, dtype=torch.int64)
        if view.budget is not None:  # without one only a policy's own rule (threshold's tau) evicts
            keep[sequences] = torch.tensor(self.keep_counts(view.budget, view.num_layers, view.num_kv_heads),
                                           dtype=torch.int64)
        return keep.flatten().to(view.device)
