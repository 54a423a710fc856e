"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Why: operators watch running / waiting requests, KV slots in use against the pool, evictions,
token counts and latency histograms. The engine thread updates them; `/metrics` renders them.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
PREFIX = "dbtrimkv_"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Counters, gauges and histograms; `render()` gives the `/metrics` text."""

    HELP = {
        "requests_running": ("gauge", "Requests in the running batch"),
        "requests_waiting": ("gauge", "Requests waiting for admission"),
        "sessions_parked": ("gauge", "Sessions whose cache is parked in the pool"),
        "sessions_spilled_total": ("counter", "Sessions written to the session store to free their slots"),
        "sessions_restored_total": ("counter", "Sessions read back from the session store (no re-prefill)"),
        "kv_memory_bytes": ("gauge", "--kv-memory: bytes the pool and the attention views may hold together"),
        "kv_pool_slots": ("gauge", "KV entries (slots) the pool holds; fixed at start-up. An entry is one token's K "
                                   "and V in one layer and KV head"),
        "kv_pool_bytes": ("gauge", "Bytes of the pool (slots x bytes per slot); fixed at start-up"),
        "kv_slots_in_use": ("gauge", "KV entries in use now (running requests and parked sessions); a request may "
                                     "hold more than its budget until eviction cuts it back, never more than its "
                                     "bound"),
        "kv_slots_in_use_peak": ("gauge", "Most KV entries ever in use at once"),
        "kv_views_bytes": ("gauge", "Bytes of the CPU attention views (contiguous per-layer copies of the cached K/V; "
                                    "0 on CUDA, where the kernels read the pool in place)"),
        "kv_views_bytes_peak": ("gauge", "Most bytes the attention views held at once"),
        "kv_views_limit_bytes": ("gauge", "Bytes of --kv-memory left to the attention views (minus the pool's)"),
        "kv_views_reserved_bytes": ("gauge", "View bytes reserved by admission (per batch: rows x widest reservation)"),
        "kv_views_skipped_total": ("counter", "Forwards that attended through the pool because their views would "
                                              "have passed their reservation"),
        "kv_slots_reserved": ("gauge", "KV entries reserved by admission (bounds of running requests + parked sessions)"),
        "kv_request_bound_slots": ("gauge", "Per-request bound for a default request with a full prefill chunk: "
                                            "budget + layers x KV heads x max(buffer, prefill chunk) entries; "
                                            "eviction cuts a request back to its budget just before a forward "
                                            "would pass it"),
        "kv_request_views_bytes": ("gauge", "View bytes reserved for a default request with a full prefill chunk"),
        "max_prefill_tokens_per_step": ("gauge", "Most prompt tokens one engine step may prefill"),
        "step_prefill_tokens_peak": ("gauge", "Most prompt tokens one engine step prefilled"),
        "evictions_total": ("counter", "Eviction passes run"),
        "evicted_entries_total": ("counter", "KV entries evicted"),
        "prompt_tokens_total": ("counter", "Prompt tokens prefilled"),
        "cached_prompt_tokens_total": ("counter", "Prompt tokens reused from a session's cache"),
        "generation_tokens_total": ("counter", "Tokens generated"),
        "requests_finished_total": ("counter", "Requests finished, by reason"),
        "requests_rejected_total": ("counter", "Requests refused, by HTTP status"),
        "engine_steps_total": ("counter", "Batched forwards run"),
        "batch_failures_total": ("counter", "Batched forwards that failed (their requests were restarted alone)"),
        "requests_restarted_total": ("counter", "Requests restarted alone after their batch's forward failed"),
        "kv_slots_reclaimed_total": ("counter", "Pool slots given back after a failed forward left them in no table"),
        "step_prefill_tokens": ("histogram", "Prompt tokens prefilled per engine step"),
        "time_to_first_token_seconds": ("histogram", "Time from arrival to the first generated token"),
        "time_per_output_token_seconds": ("histogram", "Time between consecutive generated tokens of a request"),
        "request_latency_seconds": ("histogram", "Time from arrival to the last token"),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.values: dict[str, float] = {}
        self.labelled: dict[str, dict[tuple[str, str], float]] = {}
        self.histograms = {name: Histogram(TOKEN_BUCKETS if name.endswith("_tokens") else LATENCY_BUCKETS)
                           for name, (kind, _) in self.HELP.items() if kind == "histogram"}

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name] = value

    def inc(self, name: str, amount: float = 1, label: tuple[str, str] | None = None) -> None:
        with self.lock:
            if label is None:
                self.values[name] = self.values.get(name, 0) + amount
            else:
                series = self.labelled.setdefault(name, {})
                series[label] = series.get(label, 0) + amount

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.histograms[name].observe(value)

    def get(self, name: str) -> float:
        with self.lock:
            return self.values.get(name, 0)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, (kind, help_text) in self.HELP.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
                if kind == "histogram":
                    h, total = self.histograms[name], 0
                    for bound, count in zip(self.buckets_of(h), h.counts):
                        total += count
                        lines.append(f'{full}_bucket{{le="{bound}"}} {total}')
                    lines += [f"{full}_sum {h.sum}", f"{full}_count {h.count}"]
                elif name in self.labelled:
                    for (key, value), number in sorted(self.labelled[name].items()):
                        lines.append(f'{full}{{{key}="{value}"}} {_number(number)}')
                else:
                    lines.append(f"{full} {_number(self.values.get(name, 0))}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def buckets_of(h: Histogram) -> list[str]:
        return [repr(b) for b in h.buckets] + ["+Inf"]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_metrics(text: str) -> dict[str, float]:
    """`{"name": value, 'name{key="v"}': value}` from exposition text (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
