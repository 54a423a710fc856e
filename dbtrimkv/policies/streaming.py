"""`streaming`: attention sinks plus a recent window (StreamingLLM, Xiao et al. 2023).

Each (layer, KV head) keeps the first `SINKS` positions of the sequence and fills the rest of its
share of the budget with the most recent positions. Blind to content: a baseline for what pure
recency keeps.
"""

from __future__ import annotations

import torch

from .base import register_policy
from .scored import PerHeadScorePolicy

SINKS = 4


@register_policy
class StreamingPolicy(PerHeadScorePolicy):
    name = "streaming"
    sinks = SINKS

    def slot_scores(self, cache) -> torch.Tensor:
        pos = cache.pool.pos.to(torch.float32)
        return torch.where(cache.pool.pos < self.sinks, pos.new_full((), float("inf")), pos)
