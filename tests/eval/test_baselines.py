"""Baseline policies: each keeps exactly its share of the budget per (layer, KV head) and obeys its own rule."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PANGRAM, gated_tiny_text

import dbtrimkv
from dbtrimkv.generation import generate
from dbtrimkv.policies import get_policy, policy_names
from dbtrimkv.policies.base import split_evenly
from dbtrimkv.policies.snapkv import SnapKVPolicy
from dbtrimkv.policies.streaming import StreamingPolicy
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.modeling.transformers_compat import cache_kwargs

BASELINES = ("streaming", "snapkv", "h2o", "knorm", "random")
SINKS = StreamingPolicy().sinks  # the defaults the tests below are written for
WINDOW, KERNEL = SnapKVPolicy().window, SnapKVPolicy().kernel
PROMPT = PANGRAM


@pytest.fixture(scope="module")
def model():
    return gated_tiny_text()


def run(model, policy, budget, chunk=8, prompt=PROMPT, new_tokens=6, spy=None):
    """Generate under `policy`; returns the cache and one record per eviction (entries before, kept after)."""
    model, tokenizer = model
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=budget, policy=policy, prefill_chunk=chunk,
                                                                  buffer_size=0))
    records = []
    evict = cache.evict

    def audited(sequences=None):
        c = cache
        scores = c.policy.slot_scores(c.eviction.view)
        before = {s: c.tables.entries(s).tolist() for s in range(c.segments_per_sequence)}
        info = {slot: (int(c.pool.pos[slot]), float(scores[slot]), float(c.pool.k[slot].norm()))
                for slots in before.values() for slot in slots}
        evicted = evict(sequences)
        after = {s: c.tables.entries(s).tolist() for s in range(c.segments_per_sequence)}
        records.append(dict(before=before, after=after, info=info, seen=c.seen[0], evicted=evicted))
        return evicted

    cache.evict = audited
    if spy is not None:
        spy_on_attention(cache, spy)
    generate(model, build_inputs(tokenizer, PROMPT if prompt is None else prompt), cache, max_new_tokens=new_tokens,
             do_sample=False)
    return cache, records


def spy_on_attention(cache, spy):
    """Call `spy(cache, layer, query)` at every layer's attention (after the layer's new entries are cached,
    when the policy receives the attention statistics of those queries)."""
    attend = cache.attend
    cache.attend = lambda layer, query, scale: (spy(cache, layer, query), attend(layer, query, scale))[1]


def test_baselines_are_registered_and_ignore_the_gates(model):
    """No baseline reads the learned retention: other gate weights change nothing it keeps (they do
    change what `global` keeps)."""
    assert set(BASELINES) <= set(policy_names())
    gated, tokenizer = model
    gates = {k: v.clone() for k, v in gated.state_dict().items() if "retention_gate" in k}

    def kept(policy, seed):
        with torch.no_grad():
            for name, p in gated.named_parameters():
                if "retention_gate" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(budget=40, policy=policy, prefill_chunk=8))
        generate(gated, build_inputs(tokenizer, PROMPT), cache, max_new_tokens=2, do_sample=False)
        return [[p.tolist() for p in layer] for layer in cache.retained_positions(0)]

    try:
        for name in BASELINES:
            assert kept(name, 1) == kept(name, 2), name
        assert kept("global", 1) != kept("global", 2)
    finally:
        gated.load_state_dict(gates, strict=False)


@pytest.mark.parametrize("policy", BASELINES)
def test_each_head_keeps_exactly_its_share(model, policy):
    budget = 27  # 6 segments: shares 5, 5, 5, 4, 4, 4
    cache, records = run(model, policy, budget)
    shares = split_evenly(budget, cache.segments_per_sequence)
    assert len(records) >= 5
    for record in records:
        for seg, kept in record["after"].items():
            assert set(kept) <= set(record["before"][seg])
            assert len(kept) == min(shares[seg], len(record["before"][seg])), (policy, seg)
        assert sum(map(len, record["after"].values())) == budget
    assert max(cache.peak_entries) <= budget + cache.segments_per_sequence * 8


def _check_each_eviction(records, rule):
    for record in records:
        for seg, before in record["before"].items():
            kept = set(record["after"][seg])
            rule(record, [s for s in before if s in kept], [s for s in before if s not in kept])


def test_streaming_keeps_sinks_and_the_most_recent(model):
    _, records = run(model, "streaming", budget=48)  # 8 per head: 4 sinks + the 4 newest
    assert records

    def rule(record, kept, lost):
        positions = sorted(record["info"][s][0] for s in kept + lost)
        expected = set(positions[:SINKS]) | set(positions[-(8 - SINKS):])
        assert {record["info"][s][0] for s in kept} == expected
        assert set(positions[:SINKS]) == set(range(SINKS))

    _check_each_eviction(records, rule)


def test_knorm_keeps_the_lowest_norm_keys(model):
    _, records = run(model, "knorm", budget=30)

    def rule(record, kept, lost):
        if kept and lost:
            assert max(record["info"][s][2] for s in kept) <= min(record["info"][s][2] for s in lost) + 1e-6

    _check_each_eviction(records, rule)
    assert any(r["evicted"] for r in records)


def test_random_is_seeded_and_not_recency(model):
    a, _ = run(model, "random", budget=30)
    b, _ = run(model, "random", budget=30)
    kept_a = [p.tolist() for layer in a.retained_positions(0) for p in layer]
    assert kept_a == [p.tolist() for layer in b.retained_positions(0) for p in layer]
    s, _ = run(model, "streaming", budget=30)
    assert kept_a != [p.tolist() for layer in s.retained_positions(0) for p in layer]


def brute_force_mass(queries, layer, cache, window=None):
    """Attention mass per (kv head, position) from the captured queries of one layer, in float64, by the
    definition: softmax of q.k/sqrt(d) over the head's cached entries at positions <= the query's."""
    mass = {}
    num_q = cache.num_kv_heads  # filled below from the query shape
    for query, q_pos, entries in queries:
        num_q = query.shape[1]
        group = num_q // cache.num_kv_heads
        last = int(q_pos.max())
        for t in range(query.shape[2]):
            p = int(q_pos[0, t])
            if window is not None and p <= last - window:
                continue
            for j in range(num_q):
                h = j // group
                keys = [(pos, k) for pos, k in entries[h] if pos <= p]
                logits = torch.tensor([float(query[0, j, t].double() @ k.double()) for _, k in keys])
                probs = torch.softmax(logits / math.sqrt(query.shape[-1]), 0)
                for (pos, _), prob in zip(keys, probs.tolist()):
                    mass[(h, pos)] = mass.get((h, pos), 0.0) + prob
    return mass


def layer_snapshot(cache, layer):
    """Per KV head of `layer`: [(position, key)] of its cached entries, and {position: slot}."""
    entries, slots = [], []
    for h in range(cache.num_kv_heads):
        ids = cache.tables.entries(layer * cache.num_kv_heads + h).tolist()
        entries.append([(int(cache.pool.pos[s]), cache.pool.k[s].clone()) for s in ids])
        slots.append({int(cache.pool.pos[s]): s for s in ids})
    return entries, slots


def test_h2o_accumulates_exactly_the_attention_received(model):
    """No eviction (large budget): after a chunked prefill, each entry's score is the attention mass every
    query of every chunk gave it (checked against a brute-force softmax)."""
    captured = {}

    def spy(cache, layer, query):
        captured.setdefault(layer, []).append((query.clone(), cache.plan.query_positions.clone(),
                                               layer_snapshot(cache, layer)[0]))

    cache, records = run(model, "h2o", budget=10_000, chunk=7, prompt=PROMPT[:40], new_tokens=1, spy=spy)
    assert not records and len(captured[1]) >= 3
    for layer in range(cache.num_layers):
        expected = brute_force_mass(captured[layer], layer, cache)
        _, slots = layer_snapshot(cache, layer)
        state = cache.policy_scores
        for h in range(cache.num_kv_heads):
            for pos, slot in slots[h].items():
                assert float(state[slot]) == pytest.approx(expected[(h, pos)], rel=1e-4, abs=1e-5)


def test_h2o_keeps_the_recent_half_then_the_heaviest(model):
    _, records = run(model, "h2o", budget=48)  # 8 per head: the 4 newest + the 4 heaviest of the rest

    def rule(record, kept, lost):
        info = record["info"]
        recent = [s for s in kept + lost if info[s][0] >= record["seen"] - 4]
        assert set(recent) <= set(kept) and len(recent) == 4
        heavy = [s for s in kept if s not in recent]
        if heavy and lost:
            assert min(info[s][1] for s in heavy) >= max(info[s][1] for s in lost)

    _check_each_eviction(records, rule)


def test_h2o_constructed_case_keeps_the_top_accumulated(model):
    """Hand-set accumulated scores: the entries given the highest scores are the ones kept."""
    tiny, tokenizer = model
    cache = dbtrimkv.DBTrimKVCache(tiny, dbtrimkv.DBTrimKVConfig(budget=6 * 6, policy="h2o", buffer_size=0))
    with torch.no_grad():
        tiny(**build_inputs(tokenizer, PROMPT[:30]), **cache_kwargs(cache))
    seen = cache.seen[0]
    favourite = {0: 2, 1: 9, 2: 5}  # per segment: two old positions to favour (3 heavy slots, 3 recent)
    scores = torch.zeros(cache.pool.capacity)
    for seg in range(cache.segments_per_sequence):
        for slot in cache.tables.entries(seg).tolist():
            pos = int(cache.pool.pos[slot])
            if pos in (favourite[seg % 3], favourite[seg % 3] + 1, 0):
                scores[slot] = 10.0 + pos
    cache.policy.scores = scores  # the policy's own accumulated state
    cache.evict()
    for layer, heads in enumerate(cache.retained_positions(0)):
        for h, kept in enumerate(heads):
            f = favourite[(layer * 2 + h) % 3]
            assert set(kept.tolist()) == {0, f, f + 1, seen - 1, seen - 2, seen - 3}


def test_snapkv_scores_are_the_pooled_window_attention_and_the_top_stay(model):
    """One forward of 60 prompt tokens: each entry's score is the attention of the last WINDOW queries,
    average-pooled over neighbouring entries (brute force); evictions keep the highest scores."""
    tiny, tokenizer = model
    cache = dbtrimkv.DBTrimKVCache(tiny, dbtrimkv.DBTrimKVConfig(policy="snapkv", budget=10_000))
    captured = {}

    def spy(c, layer, query):
        captured[layer] = [(query.clone(), c.plan.query_positions.clone(), layer_snapshot(c, layer)[0])]

    spy_on_attention(cache, spy)
    inputs = build_inputs(tokenizer, PROMPT[:45])
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    with torch.no_grad():
        tiny(**inputs, **cache_kwargs(cache))
    for layer in range(cache.num_layers):
        expected = brute_force_mass(captured[layer], layer, cache, window=WINDOW)
        _, slots = layer_snapshot(cache, layer)
        for h in range(cache.num_kv_heads):
            positions = sorted(slots[h])
            raw = torch.tensor([expected.get((h, p), 0.0) for p in positions])
            assert raw.sum() == pytest.approx(WINDOW * tiny.config.num_attention_heads // cache.num_kv_heads)
            pooled = torch.nn.functional.avg_pool1d(raw[None, None], KERNEL, 1, KERNEL // 2,
                                                    count_include_pad=False)[0, 0]
            got = torch.tensor([float(cache.policy_scores[slots[h][p]]) for p in positions])
            assert torch.allclose(got, pooled.float(), rtol=1e-4, atol=1e-6)
    _, records = run(model, "snapkv", budget=36, chunk=2 * WINDOW, prompt=PROMPT * 2, new_tokens=1)
    assert records

    def rule(record, kept, lost):
        if kept and lost:
            assert min(record["info"][s][1] for s in kept) >= max(record["info"][s][1] for s in lost)

    _check_each_eviction(records, rule)


@pytest.mark.parametrize("seed", range(3))
def test_snapkv_pools_each_segment_alone_however_long_the_padding(seed):
    """Segments padded to the longest of a layer (prefill) or of all layers (a decode step hands
    every layer at once): each entry's pooled score is its own segment's neighbourhood mean, the
    padding never counts, so both layouts give the same scores."""
    gen = torch.Generator().manual_seed(seed)
    policy = SnapKVPolicy(kernel=int(torch.randint(1, 4, (1,), generator=gen)) * 2 + 1)
    lengths = torch.randint(1, 12, (2, 3, 2), generator=gen)  # [L, B, H]
    for pad in (0, 5):
        width = int(lengths.max()) + pad
        valid = torch.arange(width) < lengths[..., None]
        mass = torch.where(valid, torch.rand(*valid.shape, generator=gen), 0.0)
        pooled = policy._pool(mass, valid).view(valid.shape)
        for index in torch.cartesian_prod(*(torch.arange(n) for n in lengths.shape)):
            n = int(lengths[tuple(index)])
            own = torch.nn.functional.avg_pool1d(mass[tuple(index)][None, None, :n], policy.kernel, 1,
                                                 policy.kernel // 2, count_include_pad=False)[0, 0]
            torch.testing.assert_close(pooled[tuple(index)][:n], own)


def test_baseline_budget_below_one_per_head_is_a_config_error(model):
    with pytest.raises(dbtrimkv.errors.ConfigError, match="one entry per"):
        dbtrimkv.DBTrimKVCache(model[0], dbtrimkv.DBTrimKVConfig(budget=5, policy="knorm"))


@pytest.mark.parametrize("policy", BASELINES)
def test_pipeline_and_cli_accept_every_baseline(policy):
    from dbtrimkv import DBTrimKVPipeline
    from dbtrimkv.cli import build_parser

    assert build_parser().parse_args(["chat", "--policy", policy, "hi"]).policy == policy

    pipe = DBTrimKVPipeline.from_pretrained("tiny-text", budget=30, policy=policy, config=dbtrimkv.DBTrimKVConfig(
        prefill_chunk=8, buffer_size=4))
    out = pipe.chat(PROMPT, max_new_tokens=5)
    assert out.stats.kv_entries <= 30 + 6 * 8 and out.stats.kv_entries < out.stats.kv_entries_full
    assert out.stats.evictions > 0
