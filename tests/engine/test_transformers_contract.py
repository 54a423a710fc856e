"""The transformers integration contract: the supported range, the cache keyword, and loud failures.

A transformers release that changes how the cache reaches the attention must make the first
forward raise one `IntegrationError` naming the installed and the supported versions: never a
silent run without the cache, never an obscure message from inside the hooks.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
import transformers

import dbtrimkv
from dbtrimkv.modeling import attention as retention_attention
from dbtrimkv.errors import DBTrimKVError, IntegrationError
from dbtrimkv.modeling.gates import text_attention_modules
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import (
    CACHE_KWARG, NEWEST_TESTED, OLDEST_SUPPORTED, cache_from_call, cache_kwargs, is_supported, supported_range,
)

ROOT = Path(__file__).resolve().parents[2]


def _transformers_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("transformers"))


def test_pyproject_declares_exactly_the_tested_range():
    assert _transformers_requirement() == f"transformers{supported_range()}"
    assert supported_range() == f">={OLDEST_SUPPORTED},<5.{int(NEWEST_TESTED.split('.')[1]) + 1}"


def test_installed_transformers_is_in_the_supported_range():
    assert is_supported(), f"transformers {transformers.__version__} is outside {supported_range()}"
    assert is_supported("5.17.0") and is_supported("5.25.3") and is_supported("5.25.0.dev0")
    assert not is_supported("5.16.1") and not is_supported("5.26.0") and not is_supported("6.0.0")


def test_the_cache_keyword_is_the_one_this_release_prefers():
    expected = "cache" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24) else "past_key_values"
    assert CACHE_KWARG == expected
    marker = object()
    assert cache_kwargs(marker) == {expected: marker}
    assert cache_from_call({"cache": marker}) is marker
    assert cache_from_call({"past_key_values": marker}) is marker
    assert cache_from_call({"cache": None, "past_key_values": marker}) is marker
    assert cache_from_call({"hidden_states": 1}) is None


@pytest.fixture()
def gated_text_model():
    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model)
    inputs = build_inputs(tokenizer, "A prompt that fills the cache a little.")
    return model, inputs


def test_attention_that_no_longer_passes_the_cache_fails_loudly(gated_text_model):
    """Simulate a release whose attention modules stop receiving the cache: no update ever happens."""
    model, inputs = gated_text_model
    handles = []

    def hide_cache(module, args, kwargs):
        for name in ("cache", "past_key_values"):
            kwargs.pop(name, None)
        return args, kwargs

    for module in text_attention_modules(model):
        handles.append(module.register_forward_pre_hook(hide_cache, with_kwargs=True, prepend=True))
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=64))
    with pytest.raises(IntegrationError) as err:
        model(**inputs, **cache_kwargs(cache))
    message = str(err.value)
    assert transformers.__version__ in message and supported_range() in message
    assert isinstance(err.value, DBTrimKVError)
    for handle in handles:
        handle.remove()


def test_cache_under_an_unknown_keyword_fails_loudly(gated_text_model, monkeypatch):
    """Simulate a release that renames the keyword again: the hook cannot find the cache, the attention
    still calls `update` on it."""
    model, inputs = gated_text_model
    monkeypatch.setattr(retention_attention, "cache_from_call", lambda kwargs: None)
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=64))
    with pytest.raises(IntegrationError) as err:
        model(**inputs, **cache_kwargs(cache))
    assert transformers.__version__ in str(err.value) and supported_range() in str(err.value)


def test_both_keywords_reach_the_cache(gated_text_model):
    """Users' own code may pass either name (the old one is a deprecated alias until 5.40)."""
    model, inputs = gated_text_model
    lengths = []
    for name in ("cache", "past_key_values") if CACHE_KWARG == "cache" else ("past_key_values",):
        cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=64))
        with torch.no_grad(), pytest.warns(FutureWarning) if name != CACHE_KWARG else _no_warning():
            model(**inputs, **{name: cache})
        lengths.append(cache.num_entries(0))
    assert lengths[0] > 0 and len(set(lengths)) == 1


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
