"""`random`: each (layer, KV head) keeps a uniformly random subset of its entries (seeded).

The floor every informed policy must beat. Scores are drawn afresh at every eviction from a
generator seeded once per cache (option `seed`), so a run is reproducible; `reset()` re-seeds it and
`clone()` copies its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import check_int, register_policy
from .scored import PerHeadScorePolicy


@register_policy
@dataclass
class RandomPolicy(PerHeadScorePolicy):
    name: ClassVar[str] = "random"
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_int(self.name, "seed", self.seed, 0)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"generator"}:
            raise ValueError(f"policy 'random' keeps its generator's state, got {sorted(state)}")
        self.generator.set_state(state["generator"])

    def slot_scores(self, view) -> torch.Tensor:
        return torch.rand(view.capacity, generator=self.generator).to(view.device)
