"""`CacheInvariants`: checks a live `DBTrimKVCache` at every forward and every eviction.

Why: the engine's promises (docs/architecture.md) are about every moment of a run, not its end: a
sequence never holds more than `budget + L*H*max(buffer_size, n)` entries during a forward that adds
n tokens; the statistics the user reads (`num_entries`, `peak_entries`, `retained_by_modality`,
`full_cache_entries`, `evicted_entries`) describe what the slot tables really hold; and the slot
pool never grows past the sum of the sequences' bounds nor loses slots. The checker wraps the
cache's per-forward bookkeeping (`_begin_forward`, which evicts and then appends the forward's
entries to the tables) and its `evict`, and after each one recounts everything from the raw slot
tables and the pool in plain Python, independently of the cache's own counters.

It keeps its own ledger of what the cache was fed (tokens per sequence, the modality of every
logical position, the running peak), so it does not trust the cache's request table for anything.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from dbtrimkv.cache import deferred_gates
from dbtrimkv.inputs.modality import MODALITY_NAMES


class InvariantViolation(AssertionError):
    """A property of the cache does not hold (raised with what was found)."""


class CacheInvariants:
    def __init__(self, cache):
        self.cache = cache
        self.forwards = 0
        self.evictions = 0
        self.seen: list[int] = []  # real tokens fed per sequence (own ledger)
        self.modality: list[list[int]] = []  # modality code of every logical position, per sequence
        self.peak: list[int] = []  # own running max of the recounted entries per sequence
        self.evicted = 0  # entries the tables lost in evictions (own recount)
        self.max_pool_limit = 0  # the largest sum of per-sequence bounds of any forward so far
        self.max_bound = 0  # the largest per-sequence bound of any forward so far
        self._begin_forward = cache._begin_forward
        self._evict = cache.evict
        cache._begin_forward = self._checked_forward
        cache.evict = self._checked_evict

    # --- wrappers ------------------------------------------------------------------------------
    def _checked_forward(self, batch, length, padding, device, kv_dtype):
        valid = torch.ones(batch, length, dtype=torch.bool) if padding is None else padding.cpu().bool()
        codes = self.cache._pending_modality
        codes = (torch.zeros(batch, length, dtype=torch.int8) if codes is None or tuple(codes.shape) != (batch, length)
                 else codes.cpu())
        while len(self.seen) < batch:
            self.seen.append(0), self.modality.append([]), self.peak.append(0)
        counts = [int(valid[b].sum()) for b in range(batch)]
        for b in range(batch):
            self.modality[b] += [int(codes[b, j]) for j in range(length) if valid[b, j]]
        capacity_before = self._capacity()
        self._begin_forward(batch, length, padding, device, kv_dtype)
        if self.cache.store.gates.bytes >= deferred_gates.MAX_BYTES:
            raise InvariantViolation(f"{self.cache.store.gates.bytes} bytes of gate inputs still queued as a forward "
                                     f"starts (bound {deferred_gates.MAX_BYTES})")
        for b, n in enumerate(counts):
            self.seen[b] += n
        self.forwards += 1
        held = self.check_tables()
        for b, n in enumerate(held):
            self.peak[b] = max(self.peak[b], n)
        self.check_stats(held)
        self.check_bound(held, counts)
        self.check_pool_growth(held, counts, capacity_before)

    def _checked_evict(self, sequences=None):
        before = self.check_tables()
        listed = list(range(len(before))) if sequences is None else list(sequences)
        evicted = self._evict(sequences)
        if len(self.cache.store.gates):
            raise InvariantViolation("an eviction left decode entries' gate inputs queued: it scored log beta "
                                     "that was not computed yet")
        after = self.check_tables()
        self.evictions += 1
        self.evicted += sum(before) - sum(after)
        if evicted != sum(before) - sum(after):
            raise InvariantViolation(f"evict() returned {evicted} but the tables lost {sum(before) - sum(after)} entries")
        cache = self.cache
        if cache.budget is not None:
            for b in listed:
                if after[b] > cache.budget:
                    raise InvariantViolation(f"sequence {b} holds {after[b]} entries after an eviction to budget "
                                             f"{cache.budget}")
        self.check_threshold()
        self.check_stats(after)
        return evicted

    # --- the properties -------------------------------------------------------------------------
    def _capacity(self) -> int:
        pool = self.cache.store.pool
        return 0 if pool is None else int(pool.capacity)

    def segments(self, b: int):
        lh = self.cache.segments_per_sequence
        return range(b * lh, (b + 1) * lh)

    def slots_of(self, segment: int) -> list[int]:
        """A segment's slot ids read straight from the CSR table."""
        t = self.cache.tables
        start, length = int(t.seg_start[segment]), int(t.seg_len[segment])
        return [int(x) for x in t.table[start : start + length].tolist()]

    def check_tables(self) -> list[int]:
        """Structural checks of tables and pool; returns the entries each sequence holds (recounted)."""
        cache = self.cache
        if cache.store.pool is None:
            return [0] * len(self.seen)
        pool, tables = cache.store.pool, cache.tables
        lh = cache.segments_per_sequence
        rows = len(cache.requests)
        if tables.num_segments != rows * lh:
            raise InvariantViolation(f"{tables.num_segments} segments for {rows} sequences of {lh} segments")
        used, regions, held = [], [], []
        for b in range(rows):
            count = 0
            for s in self.segments(b):
                slots = self.slots_of(s)
                start, cap = int(tables.seg_start[s]), int(tables.seg_cap[s])
                if len(slots) > cap:
                    raise InvariantViolation(f"segment {s} holds {len(slots)} ids in a region of {cap}")
                regions.append((start, start + cap))
                positions = [int(pool.pos[x]) for x in slots]
                if positions != sorted(set(positions)):
                    raise InvariantViolation(f"segment {s}: positions not strictly increasing: {positions}")
                if positions and not (0 <= positions[0] and positions[-1] < self.seen[b]):
                    raise InvariantViolation(f"segment {s}: positions {positions} outside [0, {self.seen[b]})")
                for x, p in zip(slots, positions):
                    if int(pool.modality[x]) != self.modality[b][p]:
                        raise InvariantViolation(f"slot {x} (sequence {b}, position {p}) has modality "
                                                 f"{int(pool.modality[x])}, the token was {self.modality[b][p]}")
                used += slots
                count += len(slots)
            held.append(count)
        regions.sort()
        for (_, end), (start, _) in zip(regions, regions[1:]):
            if start < end:
                raise InvariantViolation("two segments' table regions overlap")
        free = [int(x) for x in pool.free_slots[: pool.num_free].tolist()]
        if int(pool.free_top.item()) != pool.num_free:
            raise InvariantViolation(f"free_top {int(pool.free_top.item())} != num_free {pool.num_free}")
        everything = used + free
        if len(set(used)) != len(used):
            raise InvariantViolation("a slot is referenced twice by the tables")
        if sorted(everything) != list(range(pool.capacity)):
            lost = set(range(pool.capacity)) - set(everything)
            twice = [x for x, k in Counter(everything).items() if k > 1]
            raise InvariantViolation(f"slots not conserved: capacity {pool.capacity}, {len(used)} used + {len(free)} "
                                     f"free; lost {sorted(lost)[:8]}, both used and free {twice[:8]}")
        return held

    def check_stats(self, held: list[int]) -> None:
        """The cache's statistics against the recount and the checker's own ledger."""
        cache = self.cache
        lh = cache.segments_per_sequence
        if cache.store.pool is None:
            return
        for b, n in enumerate(held):
            if cache.num_entries(b) != n:
                raise InvariantViolation(f"num_entries({b}) = {cache.num_entries(b)}, the tables hold {n}")
            if cache.peak_entries[b] != self.peak[b]:
                raise InvariantViolation(f"peak_entries[{b}] = {cache.peak_entries[b]}, the most held was {self.peak[b]}")
            if cache.seen[b] != self.seen[b] or cache.full_cache_entries(b) != self.seen[b] * lh:
                raise InvariantViolation(f"sequence {b}: seen {cache.seen[b]}, full-cache entries "
                                         f"{cache.full_cache_entries(b)}; {self.seen[b]} tokens were fed")
            kept = Counter()
            for s in self.segments(b):
                for x in self.slots_of(s):
                    kept[self.modality[b][int(cache.store.pool.pos[x])]] += 1
            expected = {name: kept[code] for code, name in enumerate(MODALITY_NAMES)}
            if cache.retained_by_modality(b) != expected:
                raise InvariantViolation(f"retained_by_modality({b}) = {cache.retained_by_modality(b)}, the tables "
                                         f"hold {expected}")
            per_head = cache.retained_per_head(b).flatten().tolist()
            if per_head != [len(self.slots_of(s)) for s in self.segments(b)]:
                raise InvariantViolation(f"retained_per_head({b}) = {per_head} disagrees with the tables")
        if cache.evicted_entries != self.evicted:
            raise InvariantViolation(f"evicted_entries = {cache.evicted_entries}, the tables lost {self.evicted}")

    def bound(self, n: int) -> int | None:
        """The documented per-sequence bound for a forward adding n tokens (docs/architecture.md)."""
        cache = self.cache
        if cache.budget is None:
            return None
        return cache.budget + cache.num_layers * cache.num_kv_heads * max(cache.config.buffer_size, n)

    def check_bound(self, held: list[int], counts: list[int]) -> None:
        for b, (n_held, n) in enumerate(zip(held, counts)):
            bound = self.bound(n)
            if bound is not None and n_held > bound:
                raise InvariantViolation(f"sequence {b} holds {n_held} entries during a forward of {n} tokens; "
                                         f"the bound is {bound}")

    def check_pool_growth(self, held: list[int], counts: list[int], capacity_before: int) -> None:
        """The pool grows only when the entries no longer fit, never past the largest sum of bounds."""
        capacity = self._capacity()
        if capacity > capacity_before and sum(held) <= capacity_before:
            raise InvariantViolation(f"the pool grew from {capacity_before} to {capacity} slots although the "
                                     f"{sum(held)} entries fit")
        if self.cache.budget is None:
            return
        bounds = [self.bound(n) for n in counts]
        self.max_pool_limit = max(self.max_pool_limit, sum(bounds))
        self.max_bound = max(self.max_bound, *bounds)
        if capacity > self.max_pool_limit:
            raise InvariantViolation(f"the pool holds {capacity} slots, above the sum of the bounds "
                                     f"{self.max_pool_limit}")
        views = self.cache.views_bytes()
        if views:
            cache = self.cache
            columns = self.max_bound + max(cache.config.buffer_size, self.max_bound // 8, 1)
            segments = cache.num_layers * len(held) * cache.num_kv_heads  # K, V and a bias per column, a count
            most = segments * (columns * (2 * cache.head_dim + 1) * cache.store.pool.k.element_size() + 8)
            if views > most:
                raise InvariantViolation(f"the attention views take {views} bytes, above their bound {most}")

    def check_threshold(self) -> None:
        """Threshold policy: right after an eviction, every entry's decayed retention is at least tau
        (unless `min_per_head` protects it)."""
        cache = self.cache
        if cache.config.policy != "threshold" or cache.config.min_per_head:
            return
        log_tau = math.log(cache.config.threshold)
        for b in range(len(cache.requests)):
            t = cache.seen[b]
            for s in self.segments(b):
                for x in self.slots_of(s):
                    age = t + 1 - int(cache.pool.pos[x])
                    score = float(torch.tensor(float(age)) * cache.pool.log_beta[x].float())
                    if cache.config.lookahead > 1:
                        beta = math.exp(float(cache.pool.log_beta[x]))
                        score += math.log(sum(beta**k for k in range(cache.config.lookahead)))
                    if score < log_tau - 1e-4:  # float32 scores; the look-ahead bonus is computed in float64 here
                        raise InvariantViolation(f"sequence {b} keeps an entry scoring {score:.4f} < log tau "
                                                 f"{log_tau:.4f} after a threshold eviction")

    def check_fed(self, prompts_by_modality: list[dict[str, int]]) -> None:
        """At the end: the prompt tokens of each modality fed to the cache are those of the prompts
        (generated tokens are text)."""
        for b, expected in enumerate(prompts_by_modality):
            fed = Counter(self.modality[b])
            for code, name in enumerate(MODALITY_NAMES):
                if name != "text" and fed[code] != expected[name]:
                    raise InvariantViolation(f"sequence {b}: {fed[code]} {name} tokens fed, the prompts had "
                                             f"{expected[name]}")
