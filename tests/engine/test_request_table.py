"""Sequences join and leave a live cache without disturbing the others.

The cache is driven through its hook entry points (`stage` -> `update` -> `attend`, layer by layer)
with random K/V/queries/log beta drawn per (sequence, forward), so two caches holding different
sets of sequences see exactly the same data for a shared sequence. Eviction is per sequence, so a
sequence's entries and attention outputs must not depend on which other sequences share the cache,
nor on sequences added or removed around it.
"""

from __future__ import annotations

import pytest
import torch

import dbtrimkv
from dbtrimkv.loading.tiny import build_tiny


@pytest.fixture(scope="module")
def gated_text():
    model, _ = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    return model


def _step_data(cache, name: int, step: int, length: int, q_heads: int):
    """Random tensors of `length` real tokens of sequence `name` at forward `step`."""
    gen = torch.Generator().manual_seed(1000 * name + step)
    L, H, D = cache.num_layers, cache.num_kv_heads, cache.head_dim
    return dict(
        k=torch.randn(L, H, length, D, generator=gen), v=torch.randn(L, H, length, D, generator=gen),
        q=torch.randn(L, q_heads, length, D, generator=gen),
        log_beta=-torch.rand(L, length, H, generator=gen) * 0.5,
    )


def _given(log_beta: torch.Tensor) -> torch.Tensor:
    """A gate that returns its input: the test hands each layer's log beta as its gate input."""
    return log_beta


def _forward(cache, names: list[int], lengths: list[int], step: int, q_heads: int) -> dict[int, torch.Tensor]:
    """One left-padded forward of the listed sequences; returns each one's attention outputs
    `[L, Hq, n, D]` over its real tokens."""
    T = max(lengths)
    data = [_step_data(cache, name, step, n, q_heads) for name, n in zip(names, lengths)]
    B, L, H, D = len(names), cache.num_layers, cache.num_kv_heads, cache.head_dim
    k, v = torch.zeros(L, B, H, T, D), torch.zeros(L, B, H, T, D)
    q, log_beta = torch.zeros(L, B, q_heads, T, D), torch.zeros(L, B, T, H)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, (d, n) in enumerate(zip(data, lengths)):
        k[:, b, :, T - n :], v[:, b, :, T - n :] = d["k"], d["v"]
        q[:, b, :, T - n :], log_beta[:, b, T - n :] = d["q"], d["log_beta"]
        valid[b, T - n :] = True
    outputs = []
    for layer in range(L):
        cache.stage(layer, _given, log_beta[layer], valid)  # the "hidden states" are the log beta themselves
        cache.update(k[layer], v[layer], layer)
        outputs.append(cache.attend(layer, q[layer], cache.head_dim**-0.5))
    out = torch.stack(outputs)  # [L, B, Hq, T, D]
    return {name: out[:, b, :, T - n :] for b, (name, n) in enumerate(zip(names, lengths))}


def _entries(cache, row: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per segment of a sequence: (positions, K, log beta) of its cached entries, in table order."""
    lh = cache.segments_per_sequence
    out = []
    for s in range(row * lh, (row + 1) * lh):
        slots = cache.tables.entries(s)
        out.append((cache.pool.pos[slots].tolist(), cache.pool.k[slots], cache.pool.log_beta[slots]))
    return out


def _assert_same_entries(a, row_a, b, row_b):
    for (pos_a, k_a, lb_a), (pos_b, k_b, lb_b) in zip(_entries(a, row_a), _entries(b, row_b), strict=True):
        assert pos_a == pos_b
        torch.testing.assert_close(k_a, k_b, rtol=0, atol=0)
        torch.testing.assert_close(lb_a, lb_b, rtol=0, atol=0)
    assert a.requests[row_a] == b.requests[row_b]


def _check_pool_accounting(cache):
    cached = sum(cache.num_entries(b) for b in range(len(cache.requests)))
    assert cached == int(cache.tables.seg_len.sum())
    assert cache.pool.num_free + cached == cache.pool.capacity
    free = cache.pool.free_slots[: cache.pool.num_free].tolist()
    held = torch.cat([cache.tables.entries(s) for s in range(cache.tables.num_segments)]).tolist()
    assert len(set(free)) == len(free) and not set(free) & set(held)


@pytest.mark.parametrize("policy", ["global", "head", "snapkv"])
def test_add_and_remove_leave_the_other_sequences_unchanged(gated_text, policy):
    config = dbtrimkv.DBTrimKVConfig(memory_size=3, buffer_size=2, policy=policy)
    q_heads = gated_text.config.num_attention_heads
    shared = dbtrimkv.DBTrimKVCache(gated_text, config)  # sequences 0, 1, 2; then 1 leaves and 3 joins
    alone = dbtrimkv.DBTrimKVCache(gated_text, config)  # only 0 and 2; then 3 joins
    lengths = {0: [9, 1, 4], 1: [5, 3, 1], 2: [2, 6, 1]}
    for step in range(3):
        out_shared = _forward(shared, [0, 1, 2], [lengths[n][step] for n in (0, 1, 2)], step, q_heads)
        out_alone = _forward(alone, [0, 2], [lengths[n][step] for n in (0, 2)], step, q_heads)
        for name in (0, 2):
            torch.testing.assert_close(out_shared[name], out_alone[name], rtol=1e-6, atol=1e-6)
    assert shared.num_evictions > 0

    free_before, leaving = shared.pool.num_free, shared.num_entries(1)
    shared.remove_sequence(1)
    assert shared.pool.num_free == free_before + leaving  # its slots went back to the free list
    _check_pool_accounting(shared)
    for row in (0, 1):
        _assert_same_entries(shared, row, alone, row)

    assert shared.add_sequence() == 2 and alone.add_sequence() == 2
    assert shared.num_entries(2) == 0 and shared.requests[2].seen == 0
    for step, lens in ((3, [1, 1, 7]), (4, [3, 1, 1]), (5, [1, 2, 1])):
        out_shared = _forward(shared, [0, 2, 3], lens, step, q_heads)
        out_alone = _forward(alone, [0, 2, 3], lens, step, q_heads)
        for name in (0, 2, 3):
            torch.testing.assert_close(out_shared[name], out_alone[name], rtol=1e-6, atol=1e-6)
        for row in range(3):
            _assert_same_entries(shared, row, alone, row)
        _check_pool_accounting(shared)


def test_a_sequence_added_before_the_first_forward_and_a_bad_row(gated_text):
    cache = dbtrimkv.DBTrimKVCache(gated_text, dbtrimkv.DBTrimKVConfig(memory_size=2))
    assert cache.add_sequence() == 0 and cache.add_sequence() == 1
    q_heads = gated_text.config.num_attention_heads
    _forward(cache, [0, 1], [3, 2], 0, q_heads)
    assert [r.seen for r in cache.requests] == [3, 2]
    with pytest.raises(IndexError):
        cache.remove_sequence(2)
    with pytest.raises(dbtrimkv.errors.ConfigError, match="holds 2 sequences"):
        _forward(cache, [0], [1], 1, q_heads)


def test_clone_copies_and_reset_clears_the_request_table(gated_text):
    cache = dbtrimkv.DBTrimKVCache(gated_text, dbtrimkv.DBTrimKVConfig(memory_size=2, buffer_size=1, policy="h2o"))
    q_heads = gated_text.config.num_attention_heads
    _forward(cache, [0, 1], [6, 4], 0, q_heads)
    _forward(cache, [0, 1], [1, 1], 1, q_heads)
    copy = cache.clone()
    assert copy.requests.rows == cache.requests.rows and copy.requests is not cache.requests
    assert torch.equal(copy.policy_scores, cache.policy_scores) and copy.policy_scores is not cache.policy_scores
    copy.remove_sequence(0)
    _forward(copy, [1], [3], 2, q_heads)
    assert len(cache.requests) == 2 and cache.requests[1].seen == 5  # the original is untouched
    cache.reset()
    assert len(cache.requests) == 0 and cache.policy_scores is None and cache.plan is None


@pytest.mark.parametrize("policy,threshold", [("threshold", 0.5), ("global", None), ("snapkv", None)])
def test_entry_counts_agree_with_the_slot_tables_after_every_eviction(gated_text, policy, threshold):
    """Sequences of different lengths become due at different forwards; whatever an eviction drops
    (the threshold policy also drops low-scoring entries of sequences not due), every row's count
    is what its segments hold."""
    config = dbtrimkv.DBTrimKVConfig(memory_size=4, buffer_size=3, policy=policy, threshold=threshold)
    cache = dbtrimkv.DBTrimKVCache(gated_text, config)
    q_heads = gated_text.config.num_attention_heads
    lh = cache.segments_per_sequence
    for step, lens in enumerate([[12, 1], [1, 5], [1, 1], [6, 1], [1, 9], [1, 1]]):
        _forward(cache, [0, 1], lens, step, q_heads)
        held = cache.tables.seg_len.to(torch.int64).view(2, lh).sum(1).tolist()
        assert [cache.num_entries(b) for b in range(2)] == held
        assert all(r.peak_entries >= r.entries for r in cache.requests)
    assert cache.num_evictions > 0
