"""DBTrimKVConfig validates, explains, and round-trips through YAML / JSON and presets."""

from __future__ import annotations

import pytest

from dbtrimkv import DBTrimKVConfig
from dbtrimkv.errors import ConfigError
from dbtrimkv.settings.presets import preset_names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=10, memory_size=2), "either budget"),
        (dict(budget=0), "positive integer"),
        (dict(memory_size=-3), "positive integer"),
        (dict(policy="lru"), "unknown policy"),
        (dict(policy="threshold"), "threshold tau"),
        (dict(policy="threshold", threshold=1.5), "threshold tau"),
        (dict(threshold=0.1), "only used by the threshold policy"),
        (dict(lookahead=0), "lookahead"),
        (dict(buffer_size=-1), "buffer_size"),
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(min_per_head=True), "min_per_head"),
    ],
)
def test_invalid_settings_are_explained(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DBTrimKVConfig(**kwargs)


def test_budget_resolution():
    assert DBTrimKVConfig(memory_size=8).resolve_budget(36, 8) == 36 * 8 * 8
    assert DBTrimKVConfig(budget=1000).resolve_budget(36, 8) == 1000
    assert DBTrimKVConfig().resolve_budget(36, 8) is None
    with pytest.raises(ConfigError, match="protected tokens"):
        DBTrimKVConfig(budget=100, min_per_head=1).resolve_budget(36, 8)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    config = DBTrimKVConfig(memory_size=64, buffer_size=8, policy="threshold", threshold=0.01, lookahead=4)
    path = tmp_path / f"eviction{suffix}"
    config.save(path)
    assert DBTrimKVConfig.load(path) == config


def test_presets_load():
    names = preset_names()
    assert {"default", "budget-tight", "budget-long-video", "qwen3-vl-4b-instruct"} <= set(names)
    for name in names:
        if name.startswith(("default", "budget", "qwen3-vl")):
            assert isinstance(DBTrimKVConfig.load(name), DBTrimKVConfig)
    assert DBTrimKVConfig.load("budget-tight").memory_size == 128


def test_unknown_keys_and_missing_presets():
    with pytest.raises(ConfigError, match="unknown eviction setting"):
        DBTrimKVConfig.from_dict({"budgett": 3})
    with pytest.raises(ConfigError, match="no config file or preset"):
        DBTrimKVConfig.load("no-such-preset")


def test_replace_switches_budget_units():
    config = DBTrimKVConfig(memory_size=64)
    assert config.replace(budget=500) == DBTrimKVConfig(budget=500)
    assert config.replace(policy="head").memory_size == 64
