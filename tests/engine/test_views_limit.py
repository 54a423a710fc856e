"""`DBTrimKVCache.views_limit`: the CPU views never pass it, and a forward beyond it attends through the
pool with the same logits (the slot-pool reference path, no copy kept)."""

from __future__ import annotations

import pytest
import torch
from helpers import gated_tiny_text, randomize_gates

import dbtrimkv
from dbtrimkv.cache.views import KVViews
from dbtrimkv.generation import prefill
from dbtrimkv.modeling.transformers_compat import cache_kwargs


@pytest.fixture(scope="module")
def gated():
    model, _ = gated_tiny_text(intermediate_size=16)
    randomize_gates(model, seed=11)
    return model


def _run(model, config, ids, limit, steps=16):
    """Chunked prefill then greedy decoding; every step's logits and the views' bytes after each forward."""
    cache = dbtrimkv.DBTrimKVCache(model, config)
    cache.set_views_limit(limit)
    logits = [prefill(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, chunk=5)]
    held = [cache.views_bytes()]
    token = logits[-1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=token, position_ids=torch.tensor(cache.seen)[:, None], use_cache=True,
                        **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
            held.append(cache.views_bytes())
            token = logits[-1].argmax(-1, keepdim=True)
    return logits, held, cache


@pytest.mark.parametrize("seed", range(2))
def test_views_stay_under_the_limit_and_answers_do_not_change(gated, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, gated.config.vocab_size, (2, int(torch.randint(20, 40, (1,), generator=gen))),
                        generator=gen)
    config = dbtrimkv.DBTrimKVConfig(memory_size=4, buffer_size=3)
    free, free_held, unlimited = _run(gated, config, ids, None)
    sizes = sorted(set(free_held) - {0})
    assert unlimited.views_skipped == 0 and len(sizes) > 1
    limit = sizes[0]  # the smaller views fit, the larger ones do not
    for cap in (0, limit):
        capped, held, cache = _run(gated, config, ids, cap)
        assert max(held) <= cap and cache.views_skipped > 0
        for a, b in zip(capped, free):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert [cache.retained_per_head(b).tolist() for b in range(2)] == \
            [unlimited.retained_per_head(b).tolist() for b in range(2)]
    assert any(0 < h <= limit for h in _run(gated, config, ids, limit)[1])  # the views still served some steps


def test_planned_bytes_are_what_the_views_hold(gated):
    config = dbtrimkv.DBTrimKVConfig(memory_size=3, buffer_size=4)
    ids = torch.randint(0, gated.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    _, _, cache = _run(gated, config, ids, None, steps=1)
    views = cache.views
    layers, batch, heads, columns, dim = views.k.shape
    used = int(views.length.max()) - 1  # the decode step appended one row into the spare columns
    assert columns == KVViews.columns_for(used, config.buffer_size)
    assert views.storage_bytes() == KVViews.planned_bytes(layers, batch, heads, columns, dim, views.k.dtype)
