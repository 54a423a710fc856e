"""The bounded KV cache: slot pool, slot tables, the transformers `Cache` around them, and its file format."""

from .cache import DBTrimKVCache
from .pool import SlotPool
from .portable import load_cache, save_cache
from .tables import SlotTables

__all__ = ["DBTrimKVCache", "SlotPool", "SlotTables", "load_cache", "save_cache"]
