"""Shared machinery of the baseline policies (streaming, SnapKV, H2O, key norm, random).

Why: baselines must run in the same engine as the learned policies (same budget accounting, same
slot pool) to make comparisons fair. None of them ranks by learned retention: each computes its
own score per pool slot and calls `evict_by_slot_scores`. As in their papers, they split the
budget evenly over (layer, KV head) segments; their scores are not comparable across heads.

Attention-statistics policies name the queries they count (`observed_queries`) and receive, per
layer, the attention each cached entry got from them (`observe_attention`), computed by the cache
from the attention it already runs (`cache/attention_stats.py`). Per-slot state
lives in the cache's typed `policy_scores` field (not the policy), which `reset()` clears and
`clone()` copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import EvictionPolicy


@dataclass
class PerHeadScorePolicy(EvictionPolicy):
    """Each (layer, KV head) keeps budget / (L * H) entries, ranked by `slot_scores` (higher stays)."""

    def group_size(self, num_layers, num_kv_heads):
        return 1

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers * num_kv_heads:
            raise ConfigError(f"budget {budget} is below one entry per (layer, head) ({num_layers * num_kv_heads}) "
                              f"for policy {self.name!r}")

    def slot_scores(self, cache) -> torch.Tensor:
        """A score per pool slot (only the cached slots are read)."""
        raise NotImplementedError

    @torch.no_grad()
    def evict(self, cache, sequences):
        return self.evict_by_slot_scores(cache, sequences, self.slot_scores(cache))


def slot_state(cache) -> torch.Tensor:
    """The policy's float32 value per pool slot (`cache.policy_scores`, zeros for new capacity)."""
    state = cache.policy_scores
    capacity = cache.pool.capacity
    if state is None:
        return torch.zeros(capacity, dtype=torch.float32, device=cache.device)
    if state.numel() < capacity:
        state = torch.cat([state, state.new_zeros(capacity - state.numel())])
    return state
