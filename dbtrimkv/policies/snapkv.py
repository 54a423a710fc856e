"""`snapkv`: keep the entries the most recent queries attend to (SnapKV, Li et al. 2024).

After every forward, each cached entry is scored by the attention it receives from the last
`WINDOW` queries of that forward (the observation window: the last prompt tokens of a prefill
chunk, the new token while decoding), summed over the query heads of its KV head, then
average-pooled over neighbouring entries (`KERNEL`) so that a kept key keeps its context. An
eviction ranks each (layer, KV head) by the scores of the latest forward. With chunked prefill
every chunk's window decides what the next chunk may see, which is question-agnostic until the
question itself arrives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register_policy
from .scored import PerHeadScorePolicy, attention_mass, layer_entries, slot_state

WINDOW = 16
KERNEL = 5


@register_policy
class SnapKVPolicy(PerHeadScorePolicy):
    name = "snapkv"
    window, kernel = WINDOW, KERNEL

    def observe_attention(self, cache, layer_idx, query):
        q_pos = cache.plan.query_positions
        last = q_pos.amax(1, keepdim=True)
        in_window = (q_pos >= 0) & (q_pos > last - self.window)
        slots, key_pos, valid = layer_entries(cache, layer_idx)
        mass = attention_mass(cache, query, torch.where(in_window, q_pos, -1), slots, key_pos, valid)
        batch, heads, length = mass.shape
        pooled = F.avg_pool1d(mass.view(batch * heads, 1, length), self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False).view(batch, heads, length)
        scores = slot_state(cache).clone()
        scores[slots[valid]] = pooled[valid]
        cache.policy_scores = scores

    def slot_scores(self, cache):
        return slot_state(cache)
