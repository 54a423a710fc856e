"""Bounds on every eviction setting, in a module with no heavy imports.

Why: `DBTrimKVConfig` enforces them, and the command line states them in its argument types, which
are built before any command runs (so `dbtrimkv --help` must not import the engine to read them).
The pool holds up to budget + layers x KV heads x max(buffer_size, prefill chunk) entries per
sequence, so no file or flag may ask for an absurd reservation.
"""

MAX_BUDGET = 2**31 - 1  # slot ids are int32
MAX_MEMORY_SIZE = 2**24
MAX_BUFFER_SIZE = 8192
MAX_PREFILL_CHUNK = 2**20
MAX_LOOKAHEAD = 2**20
