"""The threshold policy without a budget: tau alone evicts (TRIM-KV's threshold mode).

Every `buffer_size` tokens the cache drops exactly the entries whose decayed retention
`beta^(t+1-i)` fell below tau, and the same settings work from Python, a YAML file and the CLI.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import randomize_gates

import dbtrimkv
from dbtrimkv.settings.eviction_settings import resolve_eviction
from dbtrimkv.generation import generate
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny

PROMPTS = ["The quick brown fox jumps over the lazy dog, twice and again.", "Short one."]


@pytest.fixture(scope="module")
def gated_text():
    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    randomize_gates(model, seed=3, bias=2.0)
    return model, tokenizer


def entries(cache, b):
    """{(layer, head, position): log beta} of every cached entry of sequence b."""
    out = {}
    for layer, heads in enumerate(cache.retained_positions(b)):
        for head, positions in enumerate(heads):
            seg = (b * cache.num_layers + layer) * cache.num_kv_heads + head
            for slot, pos in zip(cache.tables.entries(seg).tolist(), positions.tolist()):
                out[(layer, head, pos)] = float(cache.pool.log_beta[slot])
    return out


def test_tau_alone_keeps_exactly_the_entries_above_it(gated_text):
    """At every eviction (of either sequence), what stays is exactly the set of entries scoring >= log tau."""
    model, tokenizer = gated_text
    tau = 0.3
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(policy="threshold", threshold=tau, buffer_size=4,
                                                                  prefill_chunk=8))
    assert cache.budget is None
    evict, dropped = cache.evict, []

    def checked_evict(sequences=None):
        before = {b: entries(cache, b) for b in range(len(cache.requests))}
        seen = list(cache.seen)
        evicted = evict(sequences)
        for b, held in before.items():  # tau applies to every sequence, not only those due
            expected = {key for key, log_beta in held.items()
                        if float(torch.tensor(float(seen[b] + 1 - key[2])) * torch.tensor(log_beta)) >= math.log(tau)}
            assert set(entries(cache, b)) == expected
            assert cache.num_entries(b) == len(expected) == sum(cache.retained_by_modality(b).values())
            dropped.append(len(held) - len(expected))
        return evicted

    cache.evict = checked_evict
    generate(model, build_inputs(tokenizer, PROMPTS), cache, max_new_tokens=24)
    assert cache.num_evictions >= 5 and sum(dropped) == cache.evicted_entries > 0
    for b in range(2):
        assert 0 < cache.num_entries(b) < cache.full_cache_entries(b)


def test_tau_alone_bounds_memory_by_what_the_gates_keep(gated_text):
    """Between evictions a sequence gains at most L*H*buffer_size entries; right after one, every
    entry's decayed retention is >= tau, so entries older than log(tau) / log(beta_max) are gone."""
    model, tokenizer = gated_text
    tau, buffer = 0.5, 3
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(policy="threshold", threshold=tau,
                                                                  buffer_size=buffer))
    generate(model, build_inputs(tokenizer, PROMPTS[:1]), cache, max_new_tokens=40, prefill_chunk=4)
    max_log_beta = float(cache.pool.log_beta[: cache.pool.capacity].max())
    assert max_log_beta < 0
    oldest_age = math.floor(math.log(tau) / max_log_beta)  # older entries score below log tau
    lh = cache.segments_per_sequence
    assert max(cache.peak_entries) <= lh * (oldest_age + 1 + max(buffer, 4))
    assert cache.peak_entries[0] < cache.full_cache_entries(0)


def test_a_tiny_tau_keeps_everything_and_tau_one_keeps_only_the_newest(gated_text):
    model, tokenizer = gated_text
    inputs = build_inputs(tokenizer, PROMPTS[:1])
    keep_all = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(policy="threshold", threshold=1e-30,
                                                                     buffer_size=2))
    generate(model, inputs, keep_all, max_new_tokens=6)
    assert keep_all.num_evictions > 0 and keep_all.evicted_entries == 0
    assert keep_all.num_entries(0) == keep_all.full_cache_entries(0)
    strict = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(policy="threshold", threshold=1.0, buffer_size=2))
    generate(model, inputs, strict, max_new_tokens=6)
    strict.evict()
    assert strict.num_entries(0) == 0  # every gate here has beta < 1: nothing keeps beta^age >= 1


def test_the_same_settings_from_yaml_and_the_cli(gated_text, tmp_path, capsys):
    path = tmp_path / "tau.yaml"
    path.write_text(yaml.safe_dump({"eviction": {"policy": "threshold", "threshold": 0.4, "memory_size": None,
                                                 "budget": None}}))
    config = dbtrimkv.DBTrimKVConfig.load(path)
    assert (config.policy, config.threshold, config.budget, config.memory_size) == ("threshold", 0.4, None, None)
    cli_config = resolve_eviction(policy="threshold", threshold=0.4, full_cache=True)
    assert cli_config == config
    from dbtrimkv.cli import main

    assert main(["chat", "--model", "tiny-text", "--policy", "threshold", "--threshold", "0.4", "--full-cache",
                 "--buffer-size", "2", "--max-new-tokens", "8", "hello there, how are the caches today?"]) in (0, None)
    stats = capsys.readouterr().err  # the answer goes to stdout, the statistics to stderr
    assert "policy threshold, budget none (tau alone evicts)" in stats and "evictions 0" not in stats
