"""`streaming`: attention sinks plus a recent window (StreamingLLM, Xiao et al. 2023).

Each (layer, KV head) keeps the first `sinks` positions (option, default 4) of the sequence and fills the rest of its
share of the budget with the most recent positions. Blind to content: a baseline for what pure
recency keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import check_int, register_policy
from .scored import PerHeadScorePolicy


@register_policy
@dataclass
class StreamingPolicy(PerHeadScorePolicy):
    name: ClassVar[str] = "streaming"
    sinks: int = 4  # attention-sink positions every head keeps

    def __post_init__(self):
        check_int(self.name, "sinks", self.sinks, 0)

    def slot_scores(self, view) -> torch.Tensor:
        pos = view.positions.to(torch.float32)
        return torch.where(view.positions < self.sinks, pos.new_full((), float("inf")), pos)
