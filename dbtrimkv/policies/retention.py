"""Retention-score policies: DBTrimKV's global budget, per-layer, per-head (TrimKV), threshold.

All four rank entries by `(t + 1 - i) * log beta` (+ look-ahead), the learned retention decayed
to now; they differ only in which entries compete for the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .base import EvictionPolicy, register_policy


@register_policy
@dataclass
class GlobalPolicy(EvictionPolicy):
    """DBTrimKV: one top-k over every (layer, head, token) entry of the sequence."""

    name: ClassVar[str] = "global"


@register_policy
@dataclass
class LayerPolicy(EvictionPolicy):
    """Each layer keeps budget / L entries, shared by its heads."""

    name: ClassVar[str] = "layer"

    def group_size(self, num_layers, num_kv_heads):
        return num_kv_heads

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers:
            raise ConfigError(f"budget {budget} is below one entry per layer ({num_layers} layers) for policy 'layer'")


@register_policy
@dataclass
class HeadPolicy(EvictionPolicy):
    """TrimKV: each (layer, head) keeps budget / (L * H) entries."""

    name: ClassVar[str] = "head"

    def group_size(self, num_layers, num_kv_heads):
        return 1

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers * num_kv_heads:
            raise ConfigError(
                f"budget {budget} is below one entry per (layer, head) ({num_layers * num_kv_heads}) for policy 'head'"
            )


@register_policy
@dataclass
class ThresholdPolicy(EvictionPolicy):
    """Keep entries whose decayed retention beta^(t+1-i) is at least tau (`threshold`); a budget, if
    set, is a hard cap on top.

    Evicts every `buffer_size` tokens (not only when over the bound) so memory follows tau. Without a
    budget tau alone decides (TRIM-KV's threshold mode): a sequence then holds the entries whose
    decayed retention is still >= tau plus up to L*H*buffer_size new ones, which is as much as the
    gates say is worth keeping; there is no fixed bound (gates predicting beta ~ 1 keep everything).
    """

    name: ClassVar[str] = "threshold"
    periodic: ClassVar[bool] = True
    threshold: float | None = None  # tau in (0, 1]

    def __post_init__(self):
        tau = self.threshold
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
            raise ConfigError(f"the threshold policy needs threshold tau in (0, 1] (entries with beta^age >= tau "
                              f"stay), got {tau!r}")

    def min_score(self, view):
        return math.log(float(self.threshold))
