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
from .scored import PerHeadScorePolicy


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

    def observe_attention(self, view, layer_idx, attention):
        # an entry cached by this forward may reuse an evicted entry's slot: its sum starts at 0
        scores = self.slot_state(view).index_fill(0, attention.new_slots, 0.0)
        self.scores = scores.index_add_(0, attention.slots.flatten(), attention.mass.flatten())  # 0 if not valid

    def slot_scores(self, view):
        seg, slots = view.entries()
        seen = view.seen()[seg // view.segments_per_sequence]
        recent = int(view.budget // view.segments_per_sequence * self.recent_fraction)
        scores = self.slot_state(view).clone()
        scores[slots[view.positions[slots].to(torch.int64) >= seen - recent]] = float("inf")
        return scores
