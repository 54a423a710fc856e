"""Timing helpers shared by the kernel benchmarks: median wall time per call, copy bandwidth.

On CUDA the timed region is bracketed by events after a synchronisation, so host-side setup done
between calls (restoring a pool that the call mutated) is not counted.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call, device: torch.device, *, setup=None, warmup: int = 2, repeat: int = 10) -> float:
    """Median seconds of `call()` over `repeat` runs; `setup()` runs untimed before each call."""
    samples = []
    for i in range(warmup + repeat):
        if setup is not None:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            call()
            elapsed = time.perf_counter() - begin
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Bytes/s of `dst.copy_(src)` on a `num_bytes` buffer (read + write counted)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeat=20)
    return 2 * num_bytes / seconds


def count_syncs(call, device: torch.device) -> int | None:
    """Host synchronisations of one call (CUDA sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings

    synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
