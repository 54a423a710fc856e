"""The bounded KV cache: slot pool, slot tables, and the transformers `Cache` around them."""

from .cache import DBTrimKVCache
from .pool import SlotPool
from .tables import SlotTables

__all__ = ["DBTrimKVCache", "SlotPool", "SlotTables"]
