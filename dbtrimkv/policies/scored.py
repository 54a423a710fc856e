"""Shared machinery of the baseline policies (streaming, SnapKV, H2O, key norm, random).

Why: baselines must run in the same engine as the learned policies (same budget accounting, same
slot pool) to make comparisons fair. None of them ranks by learned retention: each computes its
own score per pool slot and answers with `order_by_slot_scores`. As in their papers, they split the
budget evenly over (layer, KV head) segments; their scores are not comparable across heads.

Attention-statistics policies name the queries they count (`observed_queries`) and receive, per
layer, the attention each cached entry got from them (`observe_attention`), computed by the cache
from the attention it already runs (`cache/attention_stats.py`). Per-slot state lives in the
policy instance's `scores` (each cache builds its own instance), which `reset()` clears and `clone()`
copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import EvictionPolicy
from .view import PolicyView


@dataclass
class PerHeadScorePolicy(EvictionPolicy):
    """Each (layer, KV head) keeps budget / (L * H) entries, ranked by `slot_scores` (higher stays)."""

    def group_size(self, num_layers, num_kv_heads):
        return 1

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers * num_kv_heads:
            raise ConfigError(f"budget {budget} is below one entry per (layer, head) ({num_layers * num_kv_heads}) "
                              f"for policy {self.name!r}")

    def slot_scores(self, view: PolicyView) -> torch.Tensor:
        """A score per pool slot (only the cached slots are read)."""
        raise NotImplementedError

    @torch.no_grad()
    def plan_eviction(self, view, sequences):
        return self.order_by_slot_scores(view, sequences, self.slot_scores(view))

    def slot_state(self, view: PolicyView) -> torch.Tensor:
        """This policy's float32 value per pool slot (`scores`, zeros for capacity it has not seen)."""
        state, capacity = self.scores, view.capacity
        if state is None:
            return torch.zeros(capacity, dtype=torch.float32, device=view.device)
        if state.numel() < capacity:
            state = torch.cat([state, state.new_zeros(capacity - state.numel())])
        return state
