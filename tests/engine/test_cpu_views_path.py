"""The CPU engine path (contiguous K/V views) gives the logits of the slot-pool reference path."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_gates

import dbtrimkv
from dbtrimkv.generation import prefill
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs


@pytest.fixture(scope="module")
def gated():
    model, _ = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    randomize_gates(model, seed=5)
    return model


def _run(model, config, ids, mask, chunk, steps, views: bool):
    """Chunked prefill of left-padded `ids`, then greedy decode steps; every step's logits."""
    cache = dbtrimkv.DBTrimKVCache(model, config)
    if not views:
        cache.attend_through_pool()  # attend through the slot tables (kernels/ragged_attention/naive.py)
    logits = [prefill(model, {"input_ids": ids, "attention_mask": mask}, cache, chunk=chunk)]
    token = logits[-1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(steps):
            position = torch.tensor(cache.seen)[:, None]
            out = model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
    return logits, cache


@pytest.mark.parametrize("seed", range(3))
def test_views_path_matches_slot_pool_reference_on_random_inputs(gated, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 4, (1,), generator=gen))
    length = int(torch.randint(20, 60, (1,), generator=gen))
    ids = torch.randint(0, gated.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):  # left padding
        mask[b, : int(torch.randint(1, length // 2, (1,), generator=gen))] = 0
    layers, heads = gated.config.num_hidden_layers, gated.config.num_key_value_heads
    config = dbtrimkv.DBTrimKVConfig(memory_size=int(torch.randint(2, 6, (1,), generator=gen)),
                                     buffer_size=int(torch.randint(1, 5, (1,), generator=gen)))
    chunk = int(torch.randint(3, 12, (1,), generator=gen))
    fast, cache = _run(gated, config, ids, mask, chunk, 12, views=True)
    slow, reference = _run(gated, config, ids, mask, chunk, 12, views=False)
    assert cache.views_bytes() > 0 and reference.views_bytes() == 0
    assert cache.num_evictions >= 2
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for b in range(batch):
        assert cache.retained_per_head(b).tolist() == reference.retained_per_head(b).tolist()
    assert cache.budget == config.resolve_budget(layers, heads)


def test_pool_takes_its_bound_once_in_chunked_prefill(gated):
    """The first chunk needs most of the bound: the pool allocates all of it and never grows again."""
    config = dbtrimkv.DBTrimKVConfig(memory_size=2, buffer_size=2)
    cache = dbtrimkv.DBTrimKVCache(gated, config)
    ids = torch.randint(0, gated.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(9))
    capacities = []
    for start in range(0, 40, 8):
        prefill(gated, {"input_ids": ids[:, start : start + 8]}, cache, chunk=8)
        capacities.append(cache.pool.capacity)
    bound = cache.budget + cache.segments_per_sequence * 8
    assert capacities == [bound] * len(capacities)


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
@pytest.mark.parametrize("seed", range(2))
def test_attention_statistics_from_the_views_match_the_pool_reference(gated, policy, seed):
    """SnapKV and H2O read the attention their entries received from the views the attention itself
    used (`attention_stats.from_views`); the slot-pool path recomputes it (`from_pool`, the reference).
    Same scores per slot after every forward, same entries kept, same logits."""
    gen = torch.Generator().manual_seed(40 + seed)
    batch, length = 2 + seed, 37
    ids = torch.randint(0, gated.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :9] = 0  # left padding
    config = dbtrimkv.DBTrimKVConfig(memory_size=3, buffer_size=2, policy=policy)
    fast, cache = _run(gated, config, ids, mask, 6 + seed, 9, views=True)
    slow, reference = _run(gated, config, ids, mask, 6 + seed, 9, views=False)
    assert cache.views_bytes() > 0 and reference.views_bytes() == 0
    assert cache.num_evictions >= 2 and cache.num_evictions == reference.num_evictions
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for b in range(batch):
        assert [[p.tolist() for p in layer] for layer in cache.retained_positions(b)] == \
            [[p.tolist() for p in layer] for layer in reference.retained_positions(b)]
    kept = torch.cat([cache.retained_slots(b) for b in range(batch)])
    assert torch.equal(kept, torch.cat([reference.retained_slots(b) for b in range(batch)]))
    assert cache.policy_scores[kept].abs().sum() > 0
    torch.testing.assert_close(cache.policy_scores[kept], reference.policy_scores[kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_decode_appends_equal_views_rebuilt_from_the_pool(gated, seed):
    """The decode fast path (`KVViews.plan_append` / `append`: one flat `index_copy_` per layer) leaves
    the views equal to a plain rebuild from the slot pool (the reference), on ragged left-padded rows."""
    from dbtrimkv.cache.views import KVViews

    gen = torch.Generator().manual_seed(seed)
    batch, length = 3, int(torch.randint(5, 30, (1,), generator=gen))
    ids = torch.randint(0, gated.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(memory_size=4, buffer_size=8))
    token = prefill(gated, {"input_ids": ids, "attention_mask": mask}, cache, chunk=8).argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
            out = gated(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    views, store = cache.views, cache.store
    assert views is not None and not views.stale
    fresh = KVViews(store.num_layers)
    fresh.rebuild(store.pool, *store.tables.padded_slots(store.tables.all_layer_segments(store.num_layers,
                                                                                          store.num_kv_heads)), 1)
    assert torch.equal(views.length, fresh.length)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in views.length.shape)).tolist():
        n = int(views.length[tuple(index)])
        assert torch.equal(views.k[tuple(index)][:n], fresh.k[tuple(index)][:n])
        assert torch.equal(views.v[tuple(index)][:n], fresh.v[tuple(index)][:n])
        assert torch.equal(views.bias[tuple(index)][0, :n], fresh.bias[tuple(index)][0, :n])
        assert bool((views.bias[tuple(index)][0, n:] < 0).all())


def test_a_float64_model_runs_the_views_path_like_the_pool_reference(gated):
    """A float64 model (a researcher's reference run) under chunked prefill with eviction: the views path
    merges view and new attention in the model's dtype (it once failed inside torch.lerp)."""
    import copy

    model = copy.deepcopy(gated).to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=gen)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    config = dbtrimkv.DBTrimKVConfig(memory_size=3, buffer_size=2)
    fast, cache = _run(model, config, ids, mask, 6, 6, views=True)
    slow, _ = _run(model, config, ids, mask, 6, 6, views=False)
    assert cache.num_evictions >= 2 and fast[0].dtype == torch.float64
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
