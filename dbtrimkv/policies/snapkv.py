"""`snapkv`: keep the entries the most recent queries attend to (SnapKV, Li et al. 2024).

After every forward, each cached entry is scored by the attention it receives from the last
`window` queries of that forward (the observation window: the last prompt tokens of a prefill
chunk, the new token while decoding), summed over the query heads of its KV head, then
average-pooled over the `kernel` neighbouring entries of its own (layer, KV head) (options;
defaults 16 and 5) so that a kept key keeps its context. An eviction ranks each (layer, KV head)
by the scores of the latest forward. With chunked prefill
every chunk's window decides what the next chunk may see, which is question-agnostic until the
question itself arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import check_int, register_policy
from .scored import PerHeadScorePolicy


@register_policy
@dataclass
class SnapKVPolicy(PerHeadScorePolicy):
    name: ClassVar[str] = "snapkv"
    window: int = 16  # last queries of a forward whose attention scores the entries
    kernel: int = 5  # width of the average pooling over neighbouring entries (odd)

    def __post_init__(self):
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ConfigError(f"policy 'snapkv': kernel must be odd (a centred pooling window), got {self.kernel}")

    def observed_queries(self, plan):
        q_pos = plan.query_positions
        last = q_pos.amax(1, keepdim=True)
        return (q_pos >= 0) & (q_pos > last - self.window)

    def observe_attention(self, view, layer_idx, attention):
        slots, valid, mass = attention.slots, attention.valid, attention.mass
        pooled = self._pool(mass, valid)
        state = self.slot_state(view)
        capacity = state.numel()
        scores = torch.cat([state, state.new_zeros(1)])  # a spare last slot takes the padding's writes
        scores.index_put_((torch.where(valid, slots, capacity).flatten(),), pooled.flatten())
        self.scores = scores[:capacity]

    def _pool(self, mass: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of each entry's mass over the `kernel` neighbours in its own segment (entries past the
        segment's end, padding to the longest, do not count): the same whether segments are laid out
        one layer at a time or all at once."""
        def window_sum(x):
            return F.avg_pool1d(x.reshape(-1, 1, x.shape[-1]), self.kernel, stride=1, padding=self.kernel // 2)

        return window_sum(mass) / window_sum(valid.to(mass.dtype)).clamp_min(1e-6)

    def slot_scores(self, view):
        return self.slot_state(view)
