"""`random`: each (layer, KV head) keeps a uniformly random subset of its entries (seeded).

The floor every informed policy must beat. Scores are drawn afresh at every eviction from a
generator seeded once per cache, so a run is reproducible.
"""

from __future__ import annotations

import torch

from .base import register_policy
from .scored import PerHeadScorePolicy

SEED = 0


@register_policy
class RandomPolicy(PerHeadScorePolicy):
    name = "random"

    def __init__(self, seed: int = SEED):
        self.generator = torch.Generator().manual_seed(seed)

    def slot_scores(self, cache) -> torch.Tensor:
        return torch.rand(cache.pool.capacity, generator=self.generator).to(cache.device)
