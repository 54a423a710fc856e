"""What each lmms-eval sample cost in KV memory and time, and the per-task summary.

Why: a KV method's score means little without what it kept. Each sample's record is the engine's
own `GenerationStats` of that generation (nothing re-measured here) plus the peak in bytes and the
batch it ran in; the task summary is computed from those records alone, so the same function
summarizes a live run and a samples file read back later (`dbtrimkv.lmms.report`).

A batch shares one prefill and one decode loop: its samples carry the batch's times and
`batch_size`, and tokens/s divides each sample's decode time by its batch size so a batch is
counted once.
"""

from __future__ import annotations

import statistics

from ..pipeline import PipelineOutput


def sample_cost(output: PipelineOutput, batch_size: int) -> dict:
    """One sample's record: `GenerationStats.to_dict()` plus `peak_kv_bytes`, `entry_bytes`, `batch_size`."""
    record = output.stats.to_dict()
    entry_bytes = output.cache.entry_bytes() if output.cache is not None else 0
    record.update(entry_bytes=entry_bytes, peak_kv_bytes=output.stats.peak_kv_entries * entry_bytes,
                  batch_size=batch_size)
    return record


def task_summary(records: list[dict]) -> dict:
    """Mean / max peak KV bytes, mean / max full-cache bytes for the same prompts, times and tokens/s."""
    if not records:
        return {"samples": 0}
    peak = [r["peak_kv_bytes"] for r in records]
    full = [r["kv_bytes_full"] for r in records]
    decode = sum(r["decode_seconds"] / r["batch_size"] for r in records)
    prefill = sum(r["prefill_seconds"] / r["batch_size"] for r in records)
    new_tokens = sum(r["new_tokens"] for r in records)
    return {
        "samples": len(records),
        "peak_kv_bytes_mean": statistics.fmean(peak), "peak_kv_bytes_max": max(peak),
        "peak_kv_entries_max": max(r["peak_kv_entries"] for r in records),
        "kv_bytes_full_mean": statistics.fmean(full), "kv_bytes_full_max": max(full),
        "kv_fraction_mean": statistics.fmean(p / f if f else 1.0 for p, f in zip(peak, full)),
        "prefill_seconds": prefill, "decode_seconds": decode, "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / decode if decode > 0 else 0.0,
        "policy": records[0]["policy"], "budget": records[0]["budget"],
    }
