"""Property tests: random workloads through the engine, the cache's promises checked at every forward.

A workload draws a policy (every registered one), a budget, a buffer size, a prefill chunk size,
look-ahead and per-head floor, a batch of 1-3 chats of different lengths (left-padded, some with
images), and 1-3 turns on the same cache (each turn a new user message, with or without images,
then a few generated tokens). `CacheInvariants` checks, after every forward and every eviction,
the KV bound of docs/architecture.md, every statistic against a recount of the slot tables, the
threshold rule, and the slot pool (no slot lost or shared, growth only when needed and never past
the sum of the bounds).

Hypothesis settings: profile `ci` (the default) runs a fixed number of examples derandomized,
so CI is reproducible; `DBTRIMKV_HYPOTHESIS_PROFILE=thorough` explores many more.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from helpers import randomize_gates, random_image
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from invariants import CacheInvariants, InvariantViolation

import dbtrimkv
from dbtrimkv.cache import DBTrimKVCache
from dbtrimkv.cache.eviction import EvictionTrigger
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.generation import generate
from dbtrimkv.inputs.modality import MODALITY_NAMES
from dbtrimkv.policies import policy_names, policy_option_defaults
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=400, derandomize=False)
settings.load_profile(os.environ.get("DBTRIMKV_HYPOTHESIS_PROFILE", "ci"))

LAYERS, KV_HEADS = 3, 2  # configs/tiny-qwen3-vl.yaml
LH = LAYERS * KV_HEADS
IMAGE_SIZES = [(32, 32), (48, 64), (64, 96), (96, 96)]  # 1 to 9 merged vision tokens
WORDS = "the cache keeps what lasts and drops what fades while seven wizards hex the clerks".split()


@functools.lru_cache(maxsize=1)
def gated_tiny_vl():
    """The tiny Qwen3-VL with randomized gates (betas spread over (0, 1)), built once."""
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    randomize_gates(model, seed=3, scale=2.0, bias=-1.0)
    return model, processor


@st.composite
def messages(draw, first: bool):
    """One user message: a few words, and sometimes images."""
    n_images = draw(st.integers(0, 2 if first else 1))
    content = [{"type": "image", "image": random_image(draw(st.integers(0, 99)), *draw(st.sampled_from(IMAGE_SIZES)))}
               for _ in range(n_images)]
    if first and draw(st.integers(0, 4)) == 0:  # a short clip given as frames
        frames = [random_image(draw(st.integers(0, 99)), 32, 32) for _ in range(draw(st.sampled_from([2, 4])))]
        content.append({"type": "video", "video": frames})
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12))
    content.append({"type": "text", "text": " ".join(words)})
    return [{"role": "user", "content": content}]


@st.composite
def eviction_configs(draw, policies=None):
    policy = draw(st.sampled_from(policies or policy_names()))
    buffer_size = draw(st.integers(0, 12))
    min_per_head = draw(st.sampled_from([0, 0, 0, 1, 2]))
    per_head = draw(st.integers(max(1, min_per_head), 12))
    budget = per_head * LH + draw(st.integers(0, LH - 1))  # uneven splits too
    threshold = draw(st.floats(0.05, 0.99)) if policy == "threshold" else None
    memory_size = None
    unbounded = draw(st.integers(0, 2 if policy == "threshold" else 6)) == 0  # no budget (threshold: tau alone)
    if unbounded:
        budget = None
    elif budget % LH == 0 and draw(st.booleans()):
        budget, memory_size = None, budget // LH  # the per-head way of saying it
    options = {}
    if "seed" in policy_option_defaults(policy):
        options["seed"] = draw(st.integers(0, 5))
    if "window" in policy_option_defaults(policy):
        options["window"] = draw(st.integers(1, 8))
    return DBTrimKVConfig(budget=budget, memory_size=memory_size, buffer_size=buffer_size, policy=policy,
                          threshold=threshold, lookahead=draw(st.sampled_from([1, 1, 4])),
                          min_per_head=0 if unbounded else min_per_head,
                          prefill_chunk=draw(st.integers(2, 40)), policy_options=options)


@st.composite
def workloads(draw, policies=None):
    config = draw(eviction_configs(policies))
    batch = draw(st.integers(1, 3))
    turns = [[draw(messages(first=True)) for _ in range(batch)]]
    turns += [[draw(messages(first=False)) for _ in range(batch)] for _ in range(draw(st.integers(0, 2)))]
    new_tokens = [draw(st.integers(1, 6)) for _ in turns]
    return config, turns, new_tokens


def prompt_tokens_by_modality(inputs, b: int) -> dict[str, int]:
    types = inputs["mm_token_type_ids"][b][inputs["attention_mask"][b].bool()]
    return {name: int((types == code).sum()) for code, name in enumerate(MODALITY_NAMES)}


def run_workload(config, turns, new_tokens):
    """Every turn through `dbtrimkv.generate` on one cache; returns the checker (raises on a violation)."""
    model, processor = gated_tiny_vl()
    cache = DBTrimKVCache(model, config)
    checker = CacheInvariants(cache)
    fed = [dict.fromkeys(MODALITY_NAMES, 0) for _ in turns[0]]
    capacities = []
    for chats, n_new in zip(turns, new_tokens):
        inputs = build_inputs(processor, chats)
        for b in range(len(chats)):
            for name, n in prompt_tokens_by_modality(inputs, b).items():
                fed[b][name] += n
        generate(model, inputs, cache, max_new_tokens=n_new, prefill_chunk=config.prefill_chunk)
        capacities.append(cache.pool.capacity)
    checker.check_fed(fed)
    return checker, capacities


@given(workloads())
def test_every_forward_keeps_the_bound_the_stats_and_the_pool(workload):
    config, turns, new_tokens = workload
    checker, _ = run_workload(config, turns, new_tokens)
    assert checker.forwards >= sum(new_tokens)  # every decode step was checked, prefill chunks too


@settings(max_examples=max(settings.default.max_examples // 2, 1))
@given(workloads(policies=["global", "head", "threshold", "snapkv"]), st.integers(3, 5))
def test_storage_stops_growing_across_turns(workload, extra_turns):
    """Repeating the last turn many times: the pool stays within the bound of the largest forward, so
    no number of turns makes storage grow past it."""
    config, turns, new_tokens = workload
    assume(not config.unbounded)
    turns = turns + [turns[-1]] * extra_turns
    new_tokens = new_tokens + [new_tokens[-1]] * extra_turns
    checker, capacities = run_workload(config, turns, new_tokens)
    assert max(capacities) <= checker.max_pool_limit
    # the bound of the largest forward: no amount of turns can take the pool past it
    budget = config.resolve_budget(LAYERS, KV_HEADS)
    assert capacities[-1] <= len(turns[0]) * (budget + LH * max(config.buffer_size, config.prefill_chunk))


def test_a_broken_statistic_is_caught(monkeypatch):
    """The checker can fail: a `num_entries` off by one after an eviction is reported at once."""
    from dbtrimkv.cache.requests import RequestTable

    record = RequestTable.record_eviction

    def off_by_one(self, evicted, entries):
        record(self, evicted, [n + 1 for n in entries])

    monkeypatch.setattr(RequestTable, "record_eviction", off_by_one)
    config = DBTrimKVConfig(budget=12, buffer_size=2, prefill_chunk=8)
    chats = [[{"role": "user", "content": [{"type": "text", "text": " ".join(WORDS)}]}]]
    with pytest.raises(InvariantViolation, match="num_entries"):
        run_workload(config, [chats], [3])


def test_a_broken_bound_is_caught(monkeypatch):
    """...and a cache that evicts too late (its bound one token too loose) breaks the bound check."""
    monkeypatch.setattr(EvictionTrigger, "bound", lambda self, n: self.budget + self.store.segments_per_sequence
                        * (max(self.config.buffer_size, n) + 1))
    config = DBTrimKVConfig(budget=12, buffer_size=2, prefill_chunk=8)
    chats = [[{"role": "user", "content": [{"type": "text", "text": " ".join(WORDS)}]}]]
    with pytest.raises(InvariantViolation, match="the bound is|sum of the bounds"):
        run_workload(config, [chats], [3])


def test_a_lost_slot_is_caught(monkeypatch):
    """...and a pool that forgets evicted slots (a leak: storage would grow) breaks slot conservation."""
    from dbtrimkv.cache.pool import SlotPool

    monkeypatch.setattr(SlotPool, "released", lambda self, count: None)
    monkeypatch.setattr(SlotPool, "ensure_free", lambda self, needed, limit: self._grow(self.capacity + needed)
                        if needed > self.num_free else None)
    config = DBTrimKVConfig(budget=12, buffer_size=2, prefill_chunk=8)
    chats = [[{"role": "user", "content": [{"type": "text", "text": " ".join(WORDS)}]}]]
    with pytest.raises(InvariantViolation, match="slots not conserved|free_top"):
        run_workload(config, [chats], [3])
