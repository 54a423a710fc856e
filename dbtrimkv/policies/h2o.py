"""`h2o`: heavy hitters plus recent tokens (H2O, Zhang et al. 2023).

Every cached entry accumulates the attention it receives from every query since it was cached
(summed over the query heads of its KV head). An eviction keeps, per (layer, KV head), the most
recent `recent_fraction` of its share of the budget (option, default one half), and fills the rest with the entries of highest
accumulated attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import register_policy
from .scored import PerHeadScorePolicy, slot_state


@register_policy
@dataclass
class H2OPolicy(PerHeadScorePolicy):
    name: ClassVar[str] = "h2o"
    recent_fraction: float = 0.5  # share of each head's budget kept for the most recent positions

    def __post_init__(self):
        value = self.recent_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"policy 'h2o': recent_fraction must be a number in [0, 1], got {value!r}")

    def observed_queries(self, plan):
        return plan.query_positions >= 0

    def observe_attention(self, cache, layer_idx, attention):
        q_pos = cache.plan.query_positions
        slots, key_pos, valid, mass = attention.slots, attention.positions, attention.valid, attention.mass
        first = torch.where(q_pos >= 0, q_pos, q_pos.new_full((), torch.iinfo(torch.int64).max)).amin(1)
        new = valid & (key_pos >= first[:, None, None])  # cached by this forward: its slot may be reused
        scores = slot_state(cache).clone()
        scores[slots[new]] = 0.0
        cache.policy_scores = scores.index_add_(0, slots.flatten(), mass.flatten())  # 0 where not valid

    def slot_scores(self, cache):
        seg, index = cache.tables.enumerate_entries()
        slots = cache.tables.table[index].to(torch.int64)
        seen = cache.requests.seen_tensor(cache.device)[seg // cache.segments_per_sequence]
        recent = int(cache.budget // cache.segments_per_sequence * self.recent_fraction)
        scores = slot_state(cache).clone()
        scores[slots[cache.pool.pos[slots].to(torch.int64) >= seen - recent]] = float("inf")
        return scores
