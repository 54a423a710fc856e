"""Triton select-and-compact: the eviction step on device, with one host synchronisation.

Same contract as `naive.py`. Why it is built this way:
- No sort. Every entry gets a unique integer key that orders it exactly like the reference
  (higher score, then newer position, then lower segment): the high word is an order-preserving
  image of the float32 score, the low word packs `(pos << seg_bits) | (seg_mask - local segment)`.
  The k-th best key of each group is found by a radix select over 8-bit digits (a histogram
  pass, then a tiny per-group pass that picks the digit), MSB first; an entry is kept iff its
  key is >= the group's threshold. Ties at the score threshold are resolved by the low word, so
  the kept set is the reference's. Groups stop as soon as every remaining candidate is kept,
  so with distinct scores the tie-break passes cost one early exit per program.
- `floor` runs the same select once per segment first (keep the best `floor` of each segment),
  then the group select runs over the non-floored entries with `keep - floored` room.
- Keys are computed once into scratch arrays aligned with `table` (contiguous reads in every
  pass); the slot ids are copied too, so compaction reads the copy and rewrites `table` in
  place without read/write hazards. Losers go to the free stack through an atomic on `free_top`.
- Groups with `keep >= entries` (and no `min_score`) are marked inactive by the first kernel;
  every later program of theirs exits at once.
- Entries are visited per segment (one program per segment, looping over its rows), so every
  block belongs to a single group and histograms are built in registers, then added with one
  vector atomic per segment.

Reductions and scans call `tl.reduce`/`tl.associative_scan` with triton.language's own sum
combine function instead of the `@jit` wrappers `tl.sum`/`tl.cumsum`: same code when compiled,
and the interpreter (TRITON_INTERPRET=1, how the CPU tests run) accepts it even when triton was
imported before the variable was set, on its fast numpy path.

Assumes positions are unique inside a segment (the layout keeps them strictly increasing).
The lookahead bonus uses `exp`/`log` (expm1 via Kahan's trick, which the interpreter supports)
instead of torch's `expm1`, so with `lookahead > 1` two entries whose reference scores differ by a
few ulp may be ordered differently; the contract's invariant (min kept >= max evicted, docs/architecture.md) still holds
up to that rounding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

DIGIT_BITS = 8
NUM_BINS = 1 << DIGIT_BITS
SCORE_BITS = 32
POS_BITS = 31  # positions are non-negative int32
MIN_ENTRY_BLOCK = 128
MAX_ENTRY_BLOCK = 1024
KEEP_NONE = tl.constexpr(1 << SCORE_BITS)  # threshold above every score key: the group keeps nothing


@triton.jit
def _sum(x):
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _cumsum(x, REVERSE: tl.constexpr = False):
    return tl.associative_scan(x, 0, tl.standard._sum_combine, reverse=REVERSE)


@triton.jit
def _score_key(score):
    """Order-preserving int64 image in [0, 2^32) of a float32 score (-0.0 already made +0.0)."""
    bits = score.to(tl.int32, bitcast=True)
    low = (bits & 0x7FFFFFFF).to(tl.int64)
    return tl.where(bits < 0, 0x7FFFFFFF - low, low + 0x7FFFFFFF + 1)


@triton.jit
def _neg_expm1(x):
    """1 - exp(x) for x <= 0, accurate near 0 (Kahan: expm1(x) = (u - 1) * x / log(u))."""
    u = tl.exp(x)
    um1 = u - 1.0
    exact = (u != 1.0) & (um1 != -1.0)
    kahan = um1 * x / tl.log(tl.where(exact, u, 2.0))
    return -tl.where(exact, kahan, tl.where(u == 1.0, x, um1))


@triton.jit
def _tie_key(positions, local_seg, SEG_BITS: tl.constexpr):
    """Low key word: newer position first, then lower segment."""
    return (positions.to(tl.int64) << SEG_BITS) | ((1 << SEG_BITS) - 1 - local_seg)


@triton.jit
def _at_or_above(hi, lo, thr_hi, thr_lo):
    return (hi > thr_hi) | ((hi == thr_hi) & (lo >= thr_lo))


@triton.jit
def _init_groups(seg_len, keep, state, active, n_groups, group_size, floor,
                 HAS_MIN_SCORE: tl.constexpr, BLOCK_SEGS: tl.constexpr):
    """Entry counts per group, the room left for the radix select, and the no-op flag."""
    g = tl.program_id(0)
    count = tl.full((), 0, tl.int64)
    floored = tl.full((), 0, tl.int64)
    for first in range(0, group_size, BLOCK_SEGS):
        offs = first + tl.arange(0, BLOCK_SEGS)
        lens = tl.load(seg_len + g * group_size + offs, mask=offs < group_size, other=0).to(tl.int64)
        count += _sum(lens)
        floored += _sum(tl.minimum(lens, floor))
    wanted = tl.load(keep + g).to(tl.int64)
    need = wanted - floored
    candidates = count - floored
    keeps_all = need >= candidates
    tl.store(state + g, tl.where(keeps_all | (need > 0), 0, KEEP_NONE))  # threshold, high word
    tl.store(state + n_groups + g, 0)  # threshold, low word
    tl.store(state + 2 * n_groups + g, need)  # entries still to take among the candidates
    tl.store(state + 3 * n_groups + g, (keeps_all | (need <= 0)).to(tl.int64))  # done
    tl.store(active + g, ((wanted < count) | HAS_MIN_SCORE).to(tl.int32))


@triton.jit
def _prepare(log_beta, pos, table, seg_start, seg_len, seen, active, scores, positions, slots, floor_state,
             n_seg, group_size, segs_per_seq, lookahead, log_lookahead, floor,
             HAS_LOOKAHEAD: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    """Score every entry of an active segment into the scratch arrays; init the floor select."""
    s = tl.program_id(0)
    start = tl.load(seg_start + s)
    n = tl.load(seg_len + s).to(tl.int64)
    n = tl.where(tl.load(active + s // group_size) != 0, n, 0)
    t1 = tl.load(seen + s // segs_per_seq).to(tl.int64) + 1
    for j in range(0, n, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        inside = offs < n
        slot = tl.load(table + start + offs, mask=inside, other=0)
        lb = tl.load(log_beta + slot, mask=inside, other=0.0).to(tl.float32)
        p = tl.load(pos + slot, mask=inside, other=0)
        score = (t1 - p.to(tl.int64)).to(tl.float32) * lb
        if HAS_LOOKAHEAD:
            lb_nonzero = tl.where(lb == 0.0, -1.0, lb)  # log(n) is the limit at 0; avoid log(0) there
            bonus = tl.log(_neg_expm1(lb_nonzero * lookahead)) - tl.log(_neg_expm1(lb_nonzero))
            score = score + tl.where(lb == 0.0, log_lookahead, bonus)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in the reference
        tl.store(scores + start + offs, score, mask=inside)
        tl.store(positions + start + offs, p.to(tl.int32), mask=inside)
        tl.store(slots + start + offs, slot.to(tl.int32), mask=inside)
    if HAS_FLOOR:
        need = tl.minimum(n, floor)
        tl.store(floor_state + s, 0)
        tl.store(floor_state + n_seg + s, 0)
        tl.store(floor_state + 2 * n_seg + s, need)
        tl.store(floor_state + 3 * n_seg + s, (need >= n).to(tl.int64))


@triton.jit
def _radix_histogram(scores, positions, seg_start, seg_len, state, hist, floor_state, n_groups, n_seg, group_size,
                     SEG_BITS: tl.constexpr, LOW_WORD: tl.constexpr, SHIFT: tl.constexpr,
                     SKIP_FLOORED: tl.constexpr, BLOCK: tl.constexpr, NUM_BINS: tl.constexpr):
    """Histogram of the current digit over the candidates (entries matching the prefix so far)."""
    s = tl.program_id(0)
    g = s // group_size
    done = tl.load(state + 3 * n_groups + g)
    start = tl.load(seg_start + s)
    n = tl.where(done != 0, 0, tl.load(seg_len + s).to(tl.int64))
    prefix_hi = tl.load(state + g)
    prefix_lo = tl.load(state + n_groups + g)
    if SKIP_FLOORED:
        floor_hi = tl.load(floor_state + s)
        floor_lo = tl.load(floor_state + n_seg + s)
    counts = tl.full((NUM_BINS,), 0, tl.int32)
    for j in range(0, n, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        inside = offs < n
        hi = _score_key(tl.load(scores + start + offs, mask=inside, other=0.0))
        p = tl.load(positions + start + offs, mask=inside, other=0)
        if LOW_WORD:
            lo = _tie_key(p, s - g * group_size, SEG_BITS)
            candidate = (hi == prefix_hi) & ((lo >> (SHIFT + 8)) == (prefix_lo >> (SHIFT + 8)))
            digit = (lo >> SHIFT) & (NUM_BINS - 1)
        else:
            candidate = (hi >> (SHIFT + 8)) == (prefix_hi >> (SHIFT + 8))
            digit = (hi >> SHIFT) & (NUM_BINS - 1)
        candidate &= inside
        if SKIP_FLOORED:
            candidate &= ~_at_or_above(hi, p.to(tl.int64), floor_hi, floor_lo)
        counts += tl.histogram(digit.to(tl.int32), NUM_BINS, mask=candidate)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(hist + g * NUM_BINS + bins, counts, mask=counts > 0)


@triton.jit
def _radix_choose(state, hist, n_groups, LOW_WORD: tl.constexpr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr):
    """Pick the digit holding the k-th best candidate; clear the histogram for the next pass."""
    g = tl.program_id(0)
    if tl.load(state + 3 * n_groups + g) == 0:
        bins = tl.arange(0, NUM_BINS)
        counts = tl.load(hist + g * NUM_BINS + bins).to(tl.int64)
        tl.store(hist + g * NUM_BINS + bins, tl.full((NUM_BINS,), 0, tl.int32))
        need = tl.load(state + 2 * n_groups + g)
        at_or_above = _cumsum(counts, REVERSE=True)
        digit = _sum((at_or_above >= need).to(tl.int64)) - 1
        above = _sum(tl.where(bins > digit, counts, 0))
        at_digit = _sum(tl.where(bins == digit, counts, 0))
        need -= above
        if LOW_WORD:
            word = state + n_groups + g
        else:
            word = state + g
        tl.store(word, tl.load(word) | (digit << SHIFT))
        tl.store(state + 2 * n_groups + g, need)
        tl.store(state + 3 * n_groups + g, (need == at_digit).to(tl.int64))


@triton.jit
def _compact(scores, positions, slots, table, seg_start, seg_len, active, state, floor_state, free_slots, free_top,
             n_groups, n_seg, group_size, min_score,
             SEG_BITS: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_MIN_SCORE: tl.constexpr, BLOCK: tl.constexpr):
    """Keep floored | (key >= threshold & score >= min_score); move kept ids to the front, free the rest."""
    s = tl.program_id(0)
    g = s // group_size
    is_active = tl.load(active + g) != 0
    start = tl.load(seg_start + s)
    n = tl.where(is_active, tl.load(seg_len + s).to(tl.int64), 0)
    thr_hi = tl.load(state + g)
    thr_lo = tl.load(state + n_groups + g)
    if HAS_FLOOR:
        floor_hi = tl.load(floor_state + s)
        floor_lo = tl.load(floor_state + n_seg + s)
    kept_so_far = tl.full((), 0, tl.int64)
    for j in range(0, n, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        inside = offs < n
        score = tl.load(scores + start + offs, mask=inside, other=0.0)
        p = tl.load(positions + start + offs, mask=inside, other=0)
        slot = tl.load(slots + start + offs, mask=inside, other=0)
        hi = _score_key(score)
        kept = _at_or_above(hi, _tie_key(p, s - g * group_size, SEG_BITS), thr_hi, thr_lo)
        if HAS_MIN_SCORE:
            kept &= score >= min_score
        if HAS_FLOOR:
            kept |= _at_or_above(hi, p.to(tl.int64), floor_hi, floor_lo)
        kept &= inside
        lost = inside & ~kept
        kept_i = kept.to(tl.int32)
        lost_i = lost.to(tl.int32)
        tl.store(table + start + kept_so_far + _cumsum(kept_i) - kept_i, slot, mask=kept)
        kept_so_far += _sum(kept_i).to(tl.int64)
        n_lost = _sum(lost_i).to(tl.int64)
        base = tl.atomic_add(free_top, n_lost, mask=n_lost > 0)
        tl.store(free_slots + base + _cumsum(lost_i) - lost_i, slot, mask=lost)
    if is_active:
        tl.store(seg_len + s, kept_so_far.to(seg_len.dtype.element_ty))


def _radix_select(scores, positions, seg_start, seg_len, state, hist, floor_state, n_groups, group_size,
                  skip_floored, block):
    """Run the MSB-first digit passes: score word, then the (position, segment) tie word."""
    n_seg = seg_len.numel()
    seg_bits = (group_size - 1).bit_length()
    low_bits = DIGIT_BITS * math.ceil((POS_BITS + seg_bits) / DIGIT_BITS)
    passes = [(False, shift) for shift in range(SCORE_BITS - DIGIT_BITS, -1, -DIGIT_BITS)]
    passes += [(True, shift) for shift in range(low_bits - DIGIT_BITS, -1, -DIGIT_BITS)]
    for low_word, shift in passes:
        _radix_histogram[(n_seg,)](
            scores, positions, seg_start, seg_len, state, hist, floor_state, n_groups, n_seg, group_size,
            SEG_BITS=seg_bits, LOW_WORD=low_word, SHIFT=shift, SKIP_FLOORED=skip_floored, BLOCK=block,
            NUM_BINS=NUM_BINS,
        )
        _radix_choose[(n_groups,)](state, hist, n_groups, LOW_WORD=low_word, SHIFT=shift, NUM_BINS=NUM_BINS)


def _entry_block(table: torch.Tensor, n_seg: int) -> int:
    """Rows per loop step: about one segment's capacity, within [MIN_ENTRY_BLOCK, MAX_ENTRY_BLOCK]."""
    per_segment = triton.next_power_of_2(max(1, table.numel() // max(n_seg, 1)))
    return min(MAX_ENTRY_BLOCK, max(MIN_ENTRY_BLOCK, per_segment))


@torch.no_grad()
def select_and_compact(log_beta, pos, table, seg_start, seg_len, free_slots, free_top, seen, keep,
                       group_size, segs_per_seq, lookahead=1, floor=0, min_score=None) -> int:
    """Evict in place on device and return the number of evicted entries (the one host sync)."""
    n_seg = seg_len.numel()
    if n_seg == 0:
        return 0
    n_groups = n_seg // group_size
    device = table.device
    block = _entry_block(table, n_seg)
    has_min_score = min_score is not None
    scores = torch.empty(table.numel(), dtype=torch.float32, device=device)
    positions = torch.empty(table.numel(), dtype=torch.int32, device=device)
    slots = torch.empty(table.numel(), dtype=torch.int32, device=device)
    group_state = torch.empty(4, n_groups, dtype=torch.int64, device=device)
    active = torch.empty(n_groups, dtype=torch.int32, device=device)
    floor_state = torch.empty(4, n_seg, dtype=torch.int64, device=device) if floor > 0 else group_state
    hist = torch.zeros(max(n_groups, n_seg if floor > 0 else 0), NUM_BINS, dtype=torch.int32, device=device)

    _init_groups[(n_groups,)](
        seg_len, keep, group_state, active, n_groups, group_size, floor,
        HAS_MIN_SCORE=has_min_score, BLOCK_SEGS=min(1024, triton.next_power_of_2(group_size)),
    )
    _prepare[(n_seg,)](
        log_beta, pos, table, seg_start, seg_len, seen, active, scores, positions, slots, floor_state,
        n_seg, group_size, segs_per_seq, lookahead, math.log(lookahead), floor,
        HAS_LOOKAHEAD=lookahead > 1, HAS_FLOOR=floor > 0, BLOCK=block,
    )
    if floor > 0:
        _radix_select(scores, positions, seg_start, seg_len, floor_state, hist, floor_state, n_seg, 1, False, block)
    _radix_select(scores, positions, seg_start, seg_len, group_state, hist, floor_state, n_groups, group_size,
                  floor > 0, block)
    top_before = free_top.clone()
    _compact[(n_seg,)](
        scores, positions, slots, table, seg_start, seg_len, active, group_state, floor_state, free_slots, free_top,
        n_groups, n_seg, group_size, float(min_score) if has_min_score else 0.0,
        SEG_BITS=(group_size - 1).bit_length(), HAS_FLOOR=floor > 0, HAS_MIN_SCORE=has_min_score, BLOCK=block,
    )
    return int((free_top - top_before).item())
