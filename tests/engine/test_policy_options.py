"""Policies are small dataclasses with their own options, set from Python, YAML or the CLI; each
cache owns one instance, which `reset()` restores and `clone()` copies."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import PANGRAM, gated_tiny_text

import dbtrimkv
from dbtrimkv.cli import build_parser
from dbtrimkv.commands.common import eviction_config, parse_policy_options
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import ConfigError
from dbtrimkv.generation import generate
from dbtrimkv.policies import get_policy, policy_option_defaults
from dbtrimkv.inputs.prompts import build_inputs

PROMPT = PANGRAM


@pytest.fixture(scope="module")
def gated_text():
    return gated_tiny_text()


def _run(gated_text, config, cache=None):
    model, tokenizer = gated_text
    cache = cache or dbtrimkv.DBTrimKVCache(model, config)
    generate(model, build_inputs(tokenizer, PROMPT), cache, max_new_tokens=3, do_sample=False)
    return cache


def _kept(cache):
    return [[p.tolist() for p in layer] for layer in cache.retained_positions(0)]


def test_options_and_their_checks():
    assert policy_option_defaults("snapkv") == {"window": 16, "kernel": 5}
    assert policy_option_defaults("streaming") == {"sinks": 4}
    assert policy_option_defaults("global") == {}
    assert get_policy("snapkv", window=4).options() == {"window": 4, "kernel": 5}
    with pytest.raises(ConfigError, match=r"policy 'snapkv' has no option 'windw'; its options: window"):
        get_policy("snapkv", windw=4)
    with pytest.raises(ConfigError, match="kernel must be odd"):
        DBTrimKVConfig(policy="snapkv", policy_options={"kernel": 4})
    with pytest.raises(ConfigError, match="sinks must be an integer >= 0"):
        DBTrimKVConfig(policy="streaming", policy_options={"sinks": -1})
    with pytest.raises(ConfigError, match="policy 'global' has no option"):
        DBTrimKVConfig(policy_options={"sinks": 2})
    with pytest.raises(ConfigError, match="recent_fraction"):
        DBTrimKVConfig(policy="h2o", policy_options={"recent_fraction": 2})


def test_an_option_changes_what_is_kept(gated_text):
    config = DBTrimKVConfig(budget=36, policy="streaming", prefill_chunk=8, buffer_size=0)
    no_sinks = _run(gated_text, config.replace(policy_options={"sinks": 0}))
    assert no_sinks.policy.sinks == 0
    per_head = 36 // no_sinks.segments_per_sequence
    seen = no_sinks.seen[0]
    for layer in _kept(no_sinks):
        for positions in layer:  # pure recency (plus tokens decoded since the last eviction): no sinks
            assert positions == list(range(positions[0], seen)) and seen - per_head - 1 <= positions[0] < seen - per_head
    with_sinks = _kept(_run(gated_text, config))
    assert all(positions[:4] == [0, 1, 2, 3] for layer in with_sinks for positions in layer)


def test_options_from_yaml_and_the_command_line(tmp_path, gated_text):
    path = tmp_path / "snap.yaml"
    path.write_text(yaml.safe_dump({"eviction": {"policy": "snapkv", "memory_size": 4,
                                                 "policy_options": {"window": 8, "kernel": 3}}}))
    config = DBTrimKVConfig.load(path)
    assert config.build_policy().options() == {"window": 8, "kernel": 3}
    args = build_parser().parse_args(["chat", "--config", str(path), "--policy-option", "window=32", "hi"])
    assert eviction_config(args, gated_text[0]).policy_options == {"window": 32, "kernel": 3}
    assert parse_policy_options(["recent_fraction=0.25", "seed=3"]) == {"recent_fraction": 0.25, "seed": 3}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_policy_options(["window"])


def test_a_bad_policy_option_is_one_error_line_on_the_command_line():
    run = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "chat", "--model", "tiny-text", "--policy", "snapkv",
                          "--policy-option", "windw=3", "hi"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("dbtrimkv: error: policy 'snapkv' has no option 'windw'")


def test_one_instance_per_cache_cleared_by_reset_and_copied_by_clone(gated_text):
    config = DBTrimKVConfig(budget=36, policy="random", prefill_chunk=8, buffer_size=0,
                            policy_options={"seed": 5})
    model, tokenizer = gated_text
    first = dbtrimkv.DBTrimKVCache(model, config)
    second = dbtrimkv.DBTrimKVCache(model, config)
    assert first.policy is not second.policy
    policy = first.policy
    _run(gated_text, config, first)
    assert first.policy is policy and first.num_evictions > 0
    copy = first.clone()
    assert copy.policy is not first.policy
    # the copy continues with the same generator state, so the next turn evicts the same way
    inputs = build_inputs(tokenizer, " and then some more words arrive to push it over budget again")
    generate(model, inputs, first, max_new_tokens=2, do_sample=False)
    generate(model, inputs, copy, max_new_tokens=2, do_sample=False)
    assert _kept(first) == _kept(copy)
    # reset() re-seeds: the same run again keeps the same entries as a fresh cache
    first.reset()
    assert _kept(_run(gated_text, config, first)) == _kept(_run(gated_text, config))
