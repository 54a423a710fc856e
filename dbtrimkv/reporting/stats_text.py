"""What the KV numbers mean, in the words every surface uses: the CLI summaries, `GenerationStats`,
the Gradio demo's panel and the server's /metrics help.

Why: "342 entries kept, budget 192, evictions 0" reads as if the budget were ignored. It is not:
an entry is one token's K and V in one (layer, KV head), so a token costs layers x KV heads
entries, and eviction is lazy: it cuts a sequence back to the budget only just before a forward
would take it past the bound `budget + layers x KV heads x max(buffer_size, prefill chunk)`
(docs/architecture.md, "The eviction contract"). A short prompt therefore sits above the budget
with no eviction, and the pool, which grows ahead of use by half its size, never past the bound,
allocates more bytes than the entries in it use. This module words that once. No heavy imports:
the command line uses it before torch is loaded.
"""

from __future__ import annotations

ENTRY = "an entry is one token's K and V in one layer and KV head"


def entries(n: int) -> str:
    """"1 entry", "192 entries"."""
    return f"{n} {'entry' if n == 1 else 'entries'}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_bound(budget: int | None, layers: int, kv_heads: int, buffer_size: int, prefill_chunk: int) -> int | None:
    """Most entries a sequence may hold: budget + layers x KV heads x max(buffer_size, prefill chunk)."""
    if budget is None:
        return None
    return budget + layers * kv_heads * max(buffer_size, prefill_chunk)


def budget_words(budget: int | None, policy: str) -> str:
    """"budget 192 entries", "budget none (full cache)", "budget none (tau alone evicts)"."""
    if budget is not None:
        return f"budget {entries(budget)}"
    return "budget none (tau alone evicts)" if policy == "threshold" else "budget none (full cache)"


def entry_line(layers: int, kv_heads: int) -> str:
    per_token = layers * kv_heads
    return f"{ENTRY}: {layers} layers x {kv_heads} KV heads = {entries(per_token)} per token"


def eviction_line(budget: int | None, policy: str, layers: int, kv_heads: int, buffer_size: int,
                  prefill_chunk: int, now: int | None = None) -> str:
    """When eviction runs and what bounds the cache, for these settings."""
    if budget is None:
        if policy == "threshold":
            return (f"no budget: every {buffer_size} tokens the threshold policy drops entries whose decayed retention "
                    f"is below tau; memory is what the gates keep above tau plus up to {layers * kv_heads} x "
                    f"{buffer_size} new entries")
        return "no budget: nothing is evicted (the full cache, a baseline)"
    bound = kv_bound(budget, layers, kv_heads, buffer_size, prefill_chunk)
    line = (f"eviction cuts the cache back to the budget just before a forward would pass the bound "
            f"budget + {layers * kv_heads} x max(buffer {buffer_size}, prefill chunk {prefill_chunk}) = "
            f"{entries(bound)}")
    if now is not None and now > budget:
        line += f"; until then it may hold more than the budget (now {now})"
    return line


def storage_line(allocated_bytes: int, used_bytes: int, entry_bytes: int) -> str:
    """Bytes allocated by the pool (grown ahead of use) against the bytes its entries use now."""
    room = allocated_bytes // entry_bytes if entry_bytes else 0
    return (f"storage: {format_bytes(allocated_bytes)} allocated (room for {entries(room)}), "
            f"{format_bytes(used_bytes)} used now; the pool grows ahead of use by half its size, never past the bound, "
            "and does not shrink")
