"""Every policy keeps exactly what the eviction contract (docs/architecture.md) says, and memory stays inside the stated bound."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import image_chat, random_image, randomize_gates
from transformers import LogitsProcessor, LogitsProcessorList

import dbtrimkv
from dbtrimkv.modeling.gates import text_attention_modules
from dbtrimkv.generation import generate
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs


def _score(seen, pos, log_beta, lookahead):
    s = float(torch.tensor(float(seen + 1 - pos), dtype=torch.float32) * torch.tensor(log_beta, dtype=torch.float32))
    if lookahead > 1:
        beta = math.exp(log_beta)
        s += math.log(sum(beta**k for k in range(lookahead)))
    return s


class EvictionAudit:
    """Wraps the cache's `evict`; after every eviction checks size and ordering by brute force."""

    def __init__(self, cache):
        self.cache, self.checked = cache, 0
        self._evict = cache.evict
        cache.evict = self.evict

    def _snapshot(self, b):
        c = self.cache
        out = {}
        for s in c._segment_ids(b):
            layer, head = divmod(s % c.segments_per_sequence, c.num_kv_heads)
            for slot in c.tables.entries(s).tolist():
                out[slot] = (layer, head, int(c.pool.pos[slot]), float(c.pool.log_beta[slot]))
        return out

    def evict(self, sequences=None):
        cache = self.cache
        sequences = range(len(cache.requests)) if sequences is None else sequences
        before = {b: self._snapshot(b) for b in sequences}
        seen = list(cache.seen)
        evicted = self._evict(list(sequences))
        for b in sequences:
            self._check(b, before[b], set(self._snapshot(b)), seen[b])
        self.checked += 1
        return evicted

    def _check(self, b, before, kept, seen):
        c = self.cache
        L, H = c.num_layers, c.num_kv_heads
        cfg = c.config
        assert kept <= set(before)
        group_of = {"global": lambda e: 0, "threshold": lambda e: 0, "layer": lambda e: e[0],
                    "head": lambda e: (e[0], e[1])}[cfg.policy]
        keep_counts = c.policy.keep_counts(c.budget, L, H)
        groups = {}
        for slot, e in before.items():
            groups.setdefault(group_of(e), []).append(slot)
        floor = cfg.min_per_head
        floored = set()
        if floor:
            for l in range(L):
                for h in range(H):
                    seg = [s for s, e in before.items() if e[0] == l and e[1] == h]
                    seg.sort(key=lambda s: (-_score(seen, before[s][2], before[s][3], cfg.lookahead), -before[s][2]))
                    floored |= set(seg[:floor])
                    assert set(seg[:floor]) <= kept, "per-head floor violated"
        for index, (key, slots) in enumerate(sorted(groups.items())):
            keep = keep_counts[index] if cfg.policy in ("layer", "head") else keep_counts[0]
            n_kept = len(kept & set(slots))
            if cfg.policy != "threshold":
                assert n_kept == min(keep, len(slots)), (key, n_kept, keep, len(slots))
            else:
                assert n_kept <= keep
            contested = [s for s in slots if s not in floored]
            scores = {s: _score(seen, before[s][2], before[s][3], cfg.lookahead) for s in contested}
            kept_scores = [scores[s] for s in contested if s in kept]
            lost_scores = [scores[s] for s in contested if s not in kept]
            if kept_scores and lost_scores:
                assert min(kept_scores) >= max(lost_scores) - 1e-6 * max(1.0, abs(max(lost_scores)))
            if cfg.policy == "threshold":
                assert all(v >= math.log(cfg.threshold) - 1e-6 for v in kept_scores)


class Recorder(LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.entries, self.storage = cache, [], []

    def __call__(self, input_ids, scores):
        self.entries.append(max(self.cache.num_entries(b) for b in range(input_ids.shape[0])))
        self.storage.append(self.cache.storage_bytes())
        return scores


@pytest.fixture(scope="module")
def gated_text():
    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    randomize_gates(model, seed=3)
    return model, tokenizer


CASES = [
    dict(policy="global"), dict(policy="layer"), dict(policy="head"),
    dict(policy="threshold", threshold=0.05),
    dict(policy="global", lookahead=8), dict(policy="global", min_per_head=2), dict(policy="head", lookahead=3),
    dict(policy="layer", min_per_head=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_eviction_follows_the_rule_and_memory_is_bounded(gated_text, case):
    model, tokenizer = gated_text
    memory, buffer, chunk = 6, 4, 9
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(memory_size=memory, buffer_size=buffer,
                                                                  prefill_chunk=chunk, **case))
    audit = EvictionAudit(cache)
    recorder = Recorder(cache)
    prompts = ["The quick brown fox jumps over the lazy dog, twice and again.", "Short one."]
    inputs = build_inputs(tokenizer, prompts)
    steps = 4 * memory * 2
    generate(model, inputs, cache, max_new_tokens=steps, do_sample=False,
             logits_processor=LogitsProcessorList([recorder]))
    lh = cache.segments_per_sequence
    assert audit.checked >= 3
    bound = cache.budget + lh * max(buffer, chunk)
    assert max(cache.peak_entries) <= bound
    assert max(recorder.entries) <= cache.budget + lh * buffer  # while decoding
    # the pool stops growing once generation reaches its steady state
    half = len(recorder.storage) // 2
    assert recorder.storage[half] == recorder.storage[-1]
    assert cache.storage_bytes() <= len(prompts) * bound * cache.entry_bytes()  # pool within the bound


def test_ties_keep_newest_then_lower_layer(gated_text):
    """All log beta = 0: every score ties, so the newest positions win, lower layers first."""
    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=8)
    with torch.no_grad():
        text_attention_modules(model)[0].retention_gate.bias.fill_(1e4)  # shared: logsigmoid -> 0
    budget = 15  # L*H = 6 segments: 2 full positions (12 entries) + 3 entries of the next position
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=budget, buffer_size=0))
    inputs = build_inputs(tokenizer, ["abcdefghij"])
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache))
    assert float(cache.pool.log_beta[: cache.pool.capacity].abs().max()) == 0.0
    cache.evict()
    seen = cache.seen[0]
    kept = cache.retained_positions(0)
    newest = {seen - 1, seen - 2}
    for layer in range(3):
        for head in range(2):
            got = set(kept[layer][head].tolist())
            extra = {seen - 3} if (layer, head) in {(0, 0), (0, 1), (1, 0)} else set()
            assert got == newest | extra, (layer, head, got)


def test_budget_config_errors(gated_text):
    model, _ = gated_text
    with pytest.raises(dbtrimkv.errors.ConfigError, match="protected tokens"):
        dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=10, min_per_head=2))
    with pytest.raises(dbtrimkv.errors.ConfigError, match="one entry per"):
        dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=5, policy="head"))


def test_image_entries_are_recorded_by_modality():
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    inputs = build_inputs(processor, image_chat(random_image(0), "What?"))
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache))
    counts = cache.retained_by_modality(0)
    lh = cache.segments_per_sequence
    assert counts["image"] == int((inputs["mm_token_type_ids"] == 1).sum()) * lh
    assert sum(counts.values()) == cache.num_entries(0) == inputs["input_ids"].shape[1] * lh
    positions = cache.retained_positions(0)
    assert len(positions) == 3 and len(positions[0]) == 2
    assert torch.equal(positions[1][1], torch.arange(inputs["input_ids"].shape[1]))
