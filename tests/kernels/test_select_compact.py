"""select_and_compact: Triton kernel == torch reference, and the reference == a brute-force loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from slot_pools import SlotPool, random_slot_pool

from dbtrimkv.kernels import dispatch, select_and_compact
from dbtrimkv.kernels.select_compact import naive
from dbtrimkv.policies.base import NO_LIMIT

L, H = 3, 2  # layers and KV heads of the small test pools
POLICIES = {"global": L * H, "layer": H, "head": 1}


def random_keep(seed: int, pool: SlotPool, group_size: int, fraction_range=(0.0, 1.2)) -> torch.Tensor:
    """Per-group keep counts from 0 to above the group's size (so some groups are no-ops)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    sizes = pool.seg_len.cpu().to(torch.int64).view(-1, group_size).sum(1)
    low, high = fraction_range
    fractions = low + (high - low) * torch.rand(sizes.numel(), generator=gen)
    return (sizes.double() * fractions).floor().to(torch.int64).to(pool.table.device)


def evict(impl, pool: SlotPool, keep, group_size, **options):
    """Run one implementation on a copy of the pool; returns (evicted count, pool after)."""
    after = pool.clone()
    evicted = impl(*after.select_args(), keep, group_size, L * H, **options)
    return evicted, after


def assert_same_eviction(pool: SlotPool, keep, group_size, **options):
    expected_count, expected = evict(naive.select_and_compact, pool, keep, group_size, **options)
    count, got = evict(select_and_compact, pool, keep, group_size, **options)
    assert count == expected_count
    assert torch.equal(got.seg_len, expected.seg_len)
    assert torch.equal(got.table, expected.table)  # kept ids in order; untouched slack and stale tails
    assert int(got.free_top) == int(expected.free_top) == int(pool.free_top) + count
    assert got.free_list() == expected.free_list()
    assert torch.equal(got.free_slots[int(got.free_top):], pool.free_slots[int(got.free_top):])
    return got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [11, 12])
def test_random_ragged_pools(triton_backend, device, policy, seed):
    pool = random_slot_pool(seed, batch=2, num_layers=L, num_kv_heads=H, max_len=24, device=device)
    keep = random_keep(seed, pool, POLICIES[policy])
    after = assert_same_eviction(pool, keep, POLICIES[policy])
    assert int(after.seg_len.sum()) < int(pool.seg_len.sum())  # the case does evict something


@pytest.mark.parametrize("policy", POLICIES)
def test_exact_ties_use_position_then_segment(triton_backend, device, policy):
    # log beta from a few dyadic values (and both zeros): many scores are exactly equal
    pool = random_slot_pool(21, batch=2, num_layers=L, num_kv_heads=H, max_len=20, device=device,
                            log_beta_choices=[0.0, -0.0, -0.25, -0.5])
    assert_same_eviction(pool, random_keep(21, pool, POLICIES[policy], (0.2, 0.8)), POLICIES[policy])


@pytest.mark.parametrize("policy", POLICIES)
def test_all_scores_equal(triton_backend, device, policy):
    pool = random_slot_pool(22, batch=1, num_layers=L, num_kv_heads=H, max_len=16, device=device,
                            log_beta_choices=[0.0, -0.0])  # every score is zero (signed)
    assert_same_eviction(pool, random_keep(22, pool, POLICIES[policy], (0.3, 0.7)), POLICIES[policy])


def test_keep_zero_evicts_everything(triton_backend, device):
    pool = random_slot_pool(23, batch=2, num_layers=L, num_kv_heads=H, max_len=12, device=device)
    after = assert_same_eviction(pool, torch.zeros(2, dtype=torch.int64, device=device), L * H)
    assert int(after.seg_len.sum()) == 0
    assert after.free_list() == sorted(range(pool.free_slots.numel()))


@pytest.mark.parametrize("policy", POLICIES)
def test_keep_at_least_size_is_a_noop(triton_backend, device, policy):
    pool = random_slot_pool(24, batch=2, num_layers=L, num_kv_heads=H, max_len=12, device=device)
    keep = random_keep(24, pool, POLICIES[policy], (1.0, 3.0))
    count, after = evict(select_and_compact, pool, keep, POLICIES[policy])
    assert count == 0
    for name in ("table", "seg_len", "free_slots", "free_top"):
        assert torch.equal(getattr(after, name), getattr(pool, name)), name


def test_sequences_with_different_keep_counts(triton_backend, device):
    pool = random_slot_pool(25, batch=3, num_layers=L, num_kv_heads=H, max_len=20, device=device)
    sizes = pool.seg_len.view(3, -1).sum(1).to(torch.int64)
    keep = torch.stack([sizes[0] // 4, sizes[1] - 1, sizes[2] + 5])
    after = assert_same_eviction(pool, keep, L * H)
    assert after.seg_len.view(3, -1).sum(1).tolist() == [int(sizes[0]) // 4, int(sizes[1]) - 1, int(sizes[2])]


def test_segments_longer_than_one_block(triton_backend, device):
    # the kernel walks a segment in blocks of at least 128 rows: cross block boundaries
    pool = random_slot_pool(26, batch=1, num_layers=2, num_kv_heads=1, max_len=300, device=device)
    for group_size in (2, 1):
        keep = random_keep(26, pool, group_size, (0.3, 0.6))
        assert_same_eviction(pool, keep, group_size)
        assert_same_eviction(pool, keep, group_size, floor=140, min_score=-30.0)


def test_large_positions(triton_backend, device):
    # positions near 2**31: the tie word packs all 31 position bits
    pool = random_slot_pool(27, batch=1, num_layers=L, num_kv_heads=H, max_len=16, device=device,
                            log_beta_choices=[0.0, -0.0], position_stride=2**31 // 64)
    assert int(pool.pos.max()) > 2**30
    for policy, group_size in POLICIES.items():
        assert_same_eviction(pool, random_keep(27, pool, group_size, (0.2, 0.8)), group_size)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("floor", [1, 5])
def test_floor(triton_backend, device, policy, floor):
    pool = random_slot_pool(30 + floor, batch=2, num_layers=L, num_kv_heads=H, max_len=18, device=device)
    keep = random_keep(30 + floor, pool, POLICIES[policy], (0.0, 0.9))
    after = assert_same_eviction(pool, keep, POLICIES[policy], floor=floor)
    assert torch.all(after.seg_len >= torch.clamp(pool.seg_len, max=floor))


@pytest.mark.parametrize("policy", POLICIES)
def test_min_score(triton_backend, device, policy):
    pool = random_slot_pool(40, batch=2, num_layers=L, num_kv_heads=H, max_len=18, device=device)
    scores = naive.retention_scores(pool.log_beta, pool.pos, pool.seen.max())
    threshold = float(scores[pool.table[pool.table >= 0].long()].median())
    keep = random_keep(40, pool, POLICIES[policy], (0.3, 1.5))  # some groups capped, some only filtered
    assert_same_eviction(pool, keep, POLICIES[policy], min_score=threshold)
    assert_same_eviction(pool, keep, POLICIES[policy], min_score=threshold, floor=2)
    no_budget = torch.full_like(keep, NO_LIMIT)  # the threshold policy without a budget: tau alone evicts
    after = assert_same_eviction(pool, no_budget, POLICIES[policy], min_score=threshold)
    assert 0 < int(after.seg_len.sum()) < int(pool.seg_len.sum())


def test_min_score_at_an_exact_score(triton_backend, device):
    pool = random_slot_pool(41, batch=1, num_layers=L, num_kv_heads=H, max_len=18, device=device,
                            log_beta_choices=[-0.0, -0.25, -0.5])
    big = torch.full((1,), 10**6, dtype=torch.int64, device=device)
    assert_same_eviction(pool, big, L * H, min_score=-4.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_lookahead(triton_backend, device, policy):
    """Lookahead scores use exp/log in the kernel, torch.expm1 in the reference: compare up to rounding."""
    group_size = POLICIES[policy]
    pool = random_slot_pool(50, batch=2, num_layers=L, num_kv_heads=H, max_len=20, device=device)
    pool.log_beta[::7] = 0.0  # the log(n) limit
    keep = random_keep(50, pool, group_size, (0.2, 0.9))
    _, expected = evict(naive.select_and_compact, pool, keep, group_size, lookahead=8)
    count, got = evict(select_and_compact, pool, keep, group_size, lookahead=8)
    seg_of_group = torch.arange(pool.num_segments).view(-1, group_size)
    for g, segs in enumerate(seg_of_group.tolist()):
        before = {slot: s for s in segs for slot in pool.segment_slots(s)}
        seen = pool.seen[segs[0] // (L * H)]
        slots = torch.tensor(sorted(before), dtype=torch.long, device=device)
        score = dict(zip(sorted(before), naive.retention_scores(pool.log_beta[slots], pool.pos[slots], seen,
                                                                8).tolist()))
        kept = {slot for s in segs for slot in got.segment_slots(s)}
        kept_ref = {slot for s in segs for slot in expected.segment_slots(s)}
        assert len(kept) == len(kept_ref) == min(int(keep[g]), len(before))
        evicted = set(before) - kept
        if kept and evicted:  # the contract's invariant, up to a few float32 ulps
            lowest_kept, highest_evicted = min(score[x] for x in kept), max(score[x] for x in evicted)
            assert lowest_kept >= highest_evicted - 1e-5 * max(1.0, abs(highest_evicted))
        for slot in kept ^ kept_ref:  # any disagreement is a near-tie at the threshold
            assert abs(score[slot] - min(score[x] for x in kept_ref)) <= 1e-5 * max(1.0, abs(score[slot]))
        for s in segs:  # tables stay in position order and hold exactly the kept slots
            assert got.segment_slots(s) == [x for x in pool.segment_slots(s) if x in kept]
    assert count == int(got.free_top) - int(pool.free_top)
    assert got.free_list() == sorted(pool.free_list() + [x for s in range(pool.num_segments)
                                                         for x in pool.segment_slots(s)
                                                         if x not in set(got.segment_slots(s))])


def test_one_host_read_per_call(triton_backend, device):
    """The only device-to-host read is the evicted count: one `.item()`, no tolist/bool/int/float."""
    pool = random_slot_pool(60, batch=2, num_layers=L, num_kv_heads=H, max_len=16, device=device)
    keep = random_keep(60, pool, L * H, (0.3, 0.6))
    reads = []
    with pytest.MonkeyPatch.context() as spies:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
            original = getattr(torch.Tensor, name)

            def spy(self, *args, _original=original, _name=name):
                reads.append(_name)
                return _original(self, *args)

            spies.setattr(torch.Tensor, name, spy)
        evict(select_and_compact, pool, keep, L * H, floor=1, min_score=-50.0, lookahead=2)
    assert reads == ["item"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_device_sync_per_call(triton_backend, device):
    pool = random_slot_pool(61, batch=2, num_layers=L, num_kv_heads=H, max_len=16, device=device)
    keep = random_keep(61, pool, L * H, (0.3, 0.6))
    after = pool.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            select_and_compact(*after.select_args(), keep, L * H, L * H, floor=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


# --- the reference against a brute-force loop ------------------------------------------------

def brute_force_eviction(pool: SlotPool, keep, group_size: int, segs_per_seq: int, floor=0, min_score=None):
    """Sort every group's entries in Python and apply the rules one by one."""
    lb = pool.log_beta.cpu().numpy()
    pos = pool.pos.cpu().numpy()
    seen = pool.seen.cpu().numpy()
    kept_tables, freed = [], pool.free_list()
    for g in range(pool.num_segments // group_size):
        entries = []
        for s in range(g * group_size, (g + 1) * group_size):
            t = int(seen[s // segs_per_seq])
            for slot in pool.segment_slots(s):
                score = np.float32(t + 1 - int(pos[slot])) * np.float32(lb[slot])
                entries.append((-float(score), -int(pos[slot]), s, slot))
        entries.sort()
        floored = set()
        if floor > 0:
            for s in range(g * group_size, (g + 1) * group_size):
                floored |= {e[3] for e in [e for e in entries if e[2] == s][:floor]}
        room = max(int(keep[g]) - len(floored), 0)
        chosen = [e for e in entries if e[3] not in floored][:room]
        chosen = {e[3] for e in chosen if min_score is None or -e[0] >= np.float32(min_score)}
        for s in range(g * group_size, (g + 1) * group_size):
            slots = pool.segment_slots(s)
            kept_tables.append([x for x in slots if x in floored or x in chosen])
            freed += [x for x in slots if not (x in floored or x in chosen)]
    return kept_tables, sorted(freed)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("options", [{}, {"floor": 2}, {"min_score": -6.0}, {"floor": 1, "min_score": -3.0}],
                         ids=["plain", "floor", "min_score", "floor+min_score"])
def test_reference_matches_brute_force(policy, options):
    group_size = POLICIES[policy]
    pool = random_slot_pool(70, batch=2, num_layers=L, num_kv_heads=H, max_len=14, device="cpu",
                            log_beta_choices=[0.0, -0.25, -0.5, -0.75])  # ties exercise the tie-break
    keep = random_keep(70, pool, group_size, (0.0, 1.2))
    tables, freed = brute_force_eviction(pool, keep, group_size, L * H, **options)
    count, after = evict(naive.select_and_compact, pool, keep, group_size, **options)
    assert [after.segment_slots(s) for s in range(pool.num_segments)] == tables
    assert after.free_list() == freed
    assert count == len(freed) - len(pool.free_list())


def test_reference_lookahead_bonus_is_a_geometric_sum():
    log_beta = torch.tensor([0.0, -1e-6, -0.1, -2.0, -30.0])
    n = 5
    expected = torch.log(sum(torch.exp(log_beta.double() * k) for k in range(n))).float()
    torch.testing.assert_close(naive.lookahead_bonus(log_beta, n), expected, rtol=1e-5, atol=1e-6)


# --- dispatch --------------------------------------------------------------------------------

def test_backend_for_honours_the_environment(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("DBTRIMKV_KERNELS", raising=False)
    assert dispatch.backend_for(cpu) == "torch"
    for forced in ("torch", "triton", " Triton "):
        monkeypatch.setenv("DBTRIMKV_KERNELS", forced)
        assert dispatch.backend_for(cpu) == forced.strip().lower()
    monkeypatch.setenv("DBTRIMKV_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DBTRIMKV_KERNELS"):
        dispatch.backend_for(cpu)


def test_torch_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("DBTRIMKV_KERNELS", "torch")
    calls = []
    monkeypatch.setattr(naive, "select_and_compact", lambda *a, **k: calls.append(k) or 0)
    pool = random_slot_pool(80, batch=1, num_layers=L, num_kv_heads=H, max_len=4, device="cpu")
    assert select_and_compact(*pool.select_args(), torch.zeros(1, dtype=torch.int64), L * H, L * H, floor=3) == 0
    assert calls == [{"lookahead": 1, "floor": 3, "min_score": None}]
