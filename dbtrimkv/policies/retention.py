"""Retention-score policies: DBTrimKV's global budget, per-layer, per-head (TrimKV), threshold.

All four rank entries by `(t + 1 - i) * log beta` (+ look-ahead), the learned retention decayed
to now; they differ only in which entries compete for the budget.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import EvictionPolicy, register_policy


@register_policy
class GlobalPolicy(EvictionPolicy):
    """DBTrimKV: one top-k over every (layer, head, token) entry of the sequence."""

    name = "global"


@register_policy
class LayerPolicy(EvictionPolicy):
    """Each layer keeps budget / L entries, shared by its heads."""

    name = "layer"

    def group_size(self, num_layers, num_kv_heads):
        return num_kv_heads

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers:
            raise ConfigError(f"budget {budget} is below one entry per layer ({num_layers} layers) for policy 'layer'")


@register_policy
class HeadPolicy(EvictionPolicy):
    """TrimKV: each (layer, head) keeps budget / (L * H) entries."""

    name = "head"

    def group_size(self, num_layers, num_kv_heads):
        return 1

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers * num_kv_heads:
            raise ConfigError(
                f"budget {budget} is below one entry per (layer, head) ({num_layers * num_kv_heads}) for policy 'head'"
            )


@register_policy
class ThresholdPolicy(EvictionPolicy):
    """Keep entries whose decayed retention beta^(t+1-i) is at least tau; budget is a hard cap.

    Evicts every `buffer_size` tokens (not only when over the bound) so memory follows tau.
    """

    name = "threshold"
    periodic = True

    def min_score(self, cache):
        return cache.config.min_log_score
