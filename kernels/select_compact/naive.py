"""Torch reference of select-and-compact: the eviction contract, also the CPU path.

Given the pool and the CSR slot tables (layout in `dbtrimkv.kernels`), score every cached entry,
keep the best `keep[g]` entries of each group, return the losers' slots to the free list and
compact each segment's table in place (kept ids move to the front, order preserved).

Score of an entry at logical position i of a sequence that has seen t tokens:
    s = (t + 1 - i) * log_beta                                   (float32)
    s += log(1 - beta^n) - log(1 - beta)     if lookahead n > 1   (log(n) when log_beta == 0)
Order inside a group (best first): higher score, then newer position, then lower segment id
(= lower layer, then lower head). Groups are contiguous runs of `group_size` segments: the
sequence for the `global` policy (group_size = L*H), one (sequence, layer) for `layer`
(group_size = H), one segment for `head` (group_size = 1).

Optional rules: `floor` keeps the best min(floor, len) entries of every segment whatever the
group ranking (they count against the group's keep); `min_score` (the log of the `threshold`
policy's tau) drops every non-floored entry scoring below it.
"""

from __future__ import annotations

import torch


def lookahead_bonus(log_beta: torch.Tensor, lookahead: int) -> torch.Tensor:
    """log(1 + beta + ... + beta^(n-1)) computed stably from log_beta (float32)."""
    num = torch.log(-torch.expm1(log_beta * lookahead))
    den = torch.log(-torch.expm1(log_beta))
    limit = torch.full_like(log_beta, float(torch.log(torch.tensor(float(lookahead)))))
    return torch.where(log_beta == 0, limit, num - den)


def retention_scores(log_beta: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor, lookahead: int = 1) -> torch.Tensor:
    """Eviction score of entries with the given log_beta, position and sequence length seen."""
    log_beta = log_beta.to(torch.float32)
    score = (seen.to(torch.int64) + 1 - pos.to(torch.int64)).to(torch.float32) * log_beta
    if lookahead > 1:
        score = score + lookahead_bonus(log_beta, lookahead)
    return score


def enumerate_entries(table: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor):
    """Flatten the CSR tables: (segment id, index into `table`) of every entry, in table order."""
    lens = seg_len.to(torch.int64)
    seg_of = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    offset = torch.arange(seg_of.numel(), device=lens.device) - first[seg_of]
    return seg_of, seg_start.to(torch.int64)[seg_of] + offset


def rank_in_groups(group: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor, n_seg: int):
    """Rank (0 = best) of each entry inside its group, with the deterministic tie-break."""
    order = torch.argsort((-pos) * n_seg + seg, stable=True)  # newer first, then lower segment
    order = order[torch.argsort(-score[order], stable=True)]  # higher score first
    order = order[torch.argsort(group[order], stable=True)]  # group by group
    sorted_group = group[order]
    counts = torch.bincount(sorted_group, minlength=int(group.max()) + 1 if group.numel() else 0)
    group_first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - group_first[sorted_group]
    return rank, order


def select_mask(
    log_beta, pos, table, seg_start, seg_len, seen, keep, group_size, segs_per_seq,
    lookahead=1, floor=0, min_score=None,
):
    """Which entries (in table order) survive; also returns (segment id, table index, slot) of each."""
    seg, tidx = enumerate_entries(table, seg_start, seg_len)
    slots = table[tidx].to(torch.int64)
    entry_pos = pos[slots].to(torch.int64)
    score = retention_scores(log_beta[slots], entry_pos, seen.to(torch.int64)[seg // segs_per_seq], lookahead)
    kept = keep_by_score(score, entry_pos, seg, keep, group_size, seg_len.numel(), floor, min_score)
    return kept, seg, tidx, slots


def keep_by_score(score, entry_pos, seg, keep, group_size, n_seg, floor=0, min_score=None):
    """Keep mask for entries with the given scores: per-group top-k, per-segment floor, min score."""
    group = seg // group_size
    rank, order = rank_in_groups(group, score, entry_pos, seg, n_seg)
    keep = keep.to(torch.int64)
    if floor > 0:
        seg_rank, _ = rank_in_groups(seg, score, entry_pos, seg, n_seg)
        floored = seg_rank < floor
        n_groups = keep.numel()
        floored_per_group = torch.bincount(group[floored], minlength=n_groups)
        # rank among the non-floored entries of the group, in group order
        free = (~floored)[order].to(torch.int64)
        sorted_group = group[order]
        csum = torch.cumsum(free, 0)
        counts = torch.bincount(sorted_group, minlength=n_groups)
        group_first = torch.cumsum(counts, 0) - counts
        before_group = torch.where(group_first > 0, csum[(group_first - 1).clamp(min=0)], torch.zeros_like(group_first))
        free_rank = torch.empty_like(rank)
        free_rank[order] = csum - free - before_group[sorted_group]
        room = (keep - floored_per_group).clamp(min=0)
        chosen = ~floored & (free_rank < room[group])
    else:
        floored = torch.zeros_like(rank, dtype=torch.bool)
        chosen = rank < keep[group]
    if min_score is not None:
        chosen &= score >= min_score
    return floored | chosen


@torch.no_grad()
def select_and_compact(
    log_beta: torch.Tensor,
    pos: torch.Tensor,
    table: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    free_slots: torch.Tensor,
    free_top: torch.Tensor,
    seen: torch.Tensor,
    keep: torch.Tensor,
    group_size: int,
    segs_per_seq: int,
    lookahead: int = 1,
    floor: int = 0,
    min_score: float | None = None,
) -> int:
    """Evict in place; returns the number of evicted entries (the one host synchronisation).

    Mutates `table` (compacted), `seg_len` (new lengths), `free_slots` / `free_top` (losers pushed).
    `seen[b]`: tokens seen by sequence b; `keep[g]`: entries group g may keep (>= its size: no-op).
    """
    kept, seg, _, slots = select_mask(
        log_beta, pos, table, seg_start, seg_len, seen, keep, group_size, segs_per_seq, lookahead, floor, min_score
    )
    return compact_in_place(kept, seg, slots, table, seg_start, seg_len, free_slots, free_top)


@torch.no_grad()
def select_and_compact_by_score(slot_scores, pos, table, seg_start, seg_len, free_slots, free_top, keep,
                                group_size: int, floor: int = 0) -> int:
    """`select_and_compact` ranking entries by a given score per pool slot (higher stays) instead of
    the retention score: same groups, tie-break, floor and compaction. For policies that rank by
    something else (recency, attention statistics, key norms)."""
    seg, tidx = enumerate_entries(table, seg_start, seg_len)
    slots = table[tidx].to(torch.int64)
    kept = keep_by_score(slot_scores[slots].to(torch.float32), pos[slots].to(torch.int64), seg, keep, group_size,
                         seg_len.numel(), floor, None)
    return compact_in_place(kept, seg, slots, table, seg_start, seg_len, free_slots, free_top)


def compact_in_place(kept, seg, slots, table, seg_start, seg_len, free_slots, free_top) -> int:
    """Move kept ids to the front of their segment (order kept), push the others on the free stack."""
    n_seg = seg_len.numel()
    lens = seg_len.to(torch.int64)
    first = torch.cumsum(lens, 0) - lens  # index of each segment's first entry in enumeration order
    kept_i = kept.to(torch.int64)
    kept_before = torch.cumsum(kept_i, 0) - kept_i  # kept entries before each entry, over all segments
    seg_kept_before = torch.zeros(n_seg, dtype=torch.int64, device=lens.device)
    nonempty = lens > 0
    seg_kept_before[nonempty] = kept_before[first[nonempty]]
    dest = seg_start.to(torch.int64)[seg] + kept_before - seg_kept_before[seg]
    table[dest[kept]] = slots[kept].to(table.dtype)
    seg_len.copy_(torch.bincount(seg[kept], minlength=n_seg).to(seg_len.dtype))
    evicted = slots[~kept].to(free_slots.dtype)
    top = int(free_top.item())
    free_slots[top : top + evicted.numel()] = evicted
    free_top += evicted.numel()
    return int(evicted.numel())
