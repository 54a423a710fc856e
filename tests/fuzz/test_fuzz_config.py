"""Fuzz: config files and DBTrimKVConfig values: every bad one is a ConfigError (API) or one CLI error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_harness import assert_one_clear_error

import dbtrimkv.loading.checkpoints
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import ConfigError

FILES = {
    "malformed.yaml": b"eviction: [", "tabs.yaml": b"eviction:\n\t- x", "empty.yaml": b"", "blank.yaml": b"\n\n  \n",
    "list.yaml": b"- 1\n- 2\n", "scalar.yaml": b"42", "string.yaml": b"hello", "null-section.yaml": b"eviction: null",
    "list-section.yaml": b"eviction: [1, 2]", "str-section.yaml": b"eviction: lots",
    "threshold-abc.yaml": b"eviction:\n  policy: threshold\n  threshold: abc\n  memory_size: 4",
    "threshold-nan.yaml": b"eviction:\n  policy: threshold\n  threshold: .nan\n  memory_size: 4",
    "latin1.yaml": "eviction:\n  policy: caf\xe9".encode("latin-1"), "utf16.yaml": "eviction: {}".encode("utf-16"),
    "binary.yaml": bytes(range(256)), "unknown-key.yaml": b"eviction:\n  colour: red",
    "int-key.yaml": b"eviction:\n  1: 2", "budget-str.yaml": b"eviction:\n  budget: '100'",
    "budget-float.yaml": b"eviction:\n  budget: 10.5", "budget-bool.yaml": b"eviction:\n  budget: true",
    "budget-huge.yaml": b"eviction:\n  budget: 100000000000000", "memory-nan.yaml": b"eviction:\n  memory_size: .nan",
    "buffer-huge.yaml": b"eviction:\n  buffer_size: 100000000", "chunk-zero.yaml": b"eviction:\n  prefill_chunk: 0",
    "lookahead-neg.yaml": b"eviction:\n  lookahead: -1", "policy-int.yaml": b"eviction:\n  policy: 5",
    "policy-list.yaml": b"eviction:\n  policy: [global]", "both.yaml": b"eviction:\n  budget: 5\n  memory_size: 5",
    "min-per-head-str.yaml": b"eviction:\n  min_per_head: many", "python-tag.yaml": b"!!python/object/apply:os.system ['x']",
    "alias-bomb.yaml": b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\neviction: *c",
    "malformed.json": b"{bad", "empty.json": b"", "list.json": b"[1]", "null.json": b"null",
    "nested.json": b"[" * 100000, "latin1.json": '{"policy": "caf\xe9"}'.encode("latin-1"),
    "threshold-str.json": b'{"policy": "threshold", "threshold": "0.5"}', "budget-neg.json": b'{"budget": -1}',
    "eviction-null.json": b'{"eviction": null}',
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_bad_config_file_api(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(FILES[name])
    with pytest.raises(ConfigError):
        DBTrimKVConfig.load(path)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(dbtrimkv.loading.checkpoints, "load_model", refuse)


@pytest.mark.parametrize("name", sorted(FILES)[::3])
def test_bad_config_file_cli(tmp_path, name, no_model_loads):
    path = tmp_path / name
    path.write_bytes(FILES[name])
    assert_one_clear_error(["chat", "--config", str(path), "q?"])


@pytest.mark.parametrize("kwargs", [
    dict(budget=0), dict(budget=-1), dict(budget="10"), dict(budget=1.0), dict(budget=True), dict(budget=2**40),
    dict(memory_size=0), dict(memory_size=np.float64(3)), dict(buffer_size=-1), dict(buffer_size=10**9),
    dict(prefill_chunk=0), dict(prefill_chunk=None), dict(lookahead=0), dict(min_per_head=-1),
    dict(policy=None), dict(policy=["global"]), dict(policy="threshold", threshold=float("nan")),
    dict(policy="threshold", threshold="0.5"), dict(policy="threshold", threshold=0), dict(threshold=0.5),
])
def test_bad_config_values(kwargs):
    with pytest.raises(ConfigError):
        DBTrimKVConfig(**kwargs)


@pytest.mark.parametrize("value", [np.int64(60), np.int32(60), np.uint16(60)])
def test_numpy_integer_budgets_are_accepted(value):
    config = DBTrimKVConfig(budget=value)
    assert config.budget == 60 and type(config.budget) is int
    assert json.loads(json.dumps(config.to_dict()))["budget"] == 60


def test_bad_from_dict_inputs():
    for data in (None, [], "x", {"eviction": None}, {"eviction": 3}):
        with pytest.raises(ConfigError):
            DBTrimKVConfig.from_dict(data)
    for name in (None, 3, ""):
        with pytest.raises(ConfigError):
            DBTrimKVConfig.load(name)
