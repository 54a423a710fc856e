"""Select-and-compact: one eviction step over the slot pool (see `naive.py` for the contract)."""

from __future__ import annotations

from ..dispatch import backend_for
from . import naive


def select_and_compact(log_beta, pos, table, seg_start, seg_len, free_slots, free_top, seen, keep,
                       group_size, segs_per_seq, lookahead=1, floor=0, min_score=None) -> int:
    """Evict in place and return the number of evicted entries; Triton on CUDA, torch elsewhere."""
    args = (log_beta, pos, table, seg_start, seg_len, free_slots, free_top, seen, keep, group_size, segs_per_seq)
    if backend_for(table) == "triton":
        from .triton_kernel import select_and_compact as impl
    else:
        impl = naive.select_and_compact
    return impl(*args, lookahead=lookahead, floor=floor, min_score=min_score)


def select_and_compact_by_score(slot_scores, pos, table, seg_start, seg_len, free_slots, free_top, keep,
                                group_size, floor=0) -> int:
    """Evict in place ranking by a score per slot (baseline policies); torch on every device (no
    Triton version: baselines are for comparison, not speed)."""
    return naive.select_and_compact_by_score(slot_scores, pos, table, seg_start, seg_len, free_slots, free_top,
                                             keep, group_size, floor)


__all__ = ["select_and_compact", "select_and_compact_by_score", "naive"]
