"""`knorm`: keep the keys with the lowest L2 norm (Devoto et al. 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression").

Their observation: keys with a low norm tend to draw high attention, so the lowest-norm keys of
each (layer, KV head) stay. Needs no attention scores, hence works with any attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import register_policy
from .scored import PerHeadScorePolicy


@register_policy
@dataclass
class KeyNormPolicy(PerHeadScorePolicy):
    name: ClassVar[str] = "knorm"

    def slot_scores(self, view) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys.to(torch.float32), dim=-1)
