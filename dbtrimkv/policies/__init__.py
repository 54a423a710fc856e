"""Eviction policies, registered by name.

Why: researchers compare policies under the same budget accounting and the same storage. Each
policy is one small class registered here; the cache asks the configured policy to shrink a
sequence to its budget. `global` (DBTrimKV), `layer`, `head` (TrimKV) and `threshold` rank
entries by their learned retention score.
"""

from __future__ import annotations

from .base import EvictionPolicy, get_policy, policy_names, register_policy
from . import retention  # noqa: F401  (registers the retention policies)
from . import h2o, knorm, random_evict, snapkv, streaming  # noqa: F401  (registers the baselines)

__all__ = ["EvictionPolicy", "get_policy", "policy_names", "register_policy"]
