"""Eviction policies, registered by name.

Why: researchers compare policies under the same budget accounting and the same storage. Each
policy is one small class registered here; the cache asks the configured policy to shrink a
sequence to its budget. `global` (DBTrimKV), `layer`, `head` (TrimKV) and `threshold` rank
entries by their learned retention score; the baselines (streaming, snapkv, h2o, knorm, random) by
their own statistics. Each is a dataclass whose fields are its options (see `base`).
"""

from __future__ import annotations

from .base import EvictionPolicy, get_policy, policy_class, policy_names, policy_option_defaults, register_policy
from . import retention  # noqa: F401  (registers the retention policies)
from . import h2o, knorm, random_evict, snapkv, streaming  # noqa: F401  (registers the baselines)

__all__ = ["EvictionPolicy", "get_policy", "policy_class", "policy_names", "policy_option_defaults", "register_policy"]
