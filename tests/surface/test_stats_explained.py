"""The KV stats explain themselves in every surface (issue 27, item 1): what an entry is, the budget,
the bound and when eviction runs, peak vs now, storage allocated vs used; presets sized relative to
the model; "1 entry"."""

from __future__ import annotations

import re

import pytest

import dbtrimkv
from dbtrimkv.commands.common import eviction_config
from dbtrimkv.cli import build_parser
from dbtrimkv.settings.eviction_settings import resolve_eviction
from dbtrimkv.pipeline import DBTrimKVPipeline, GenerationStats
from dbtrimkv.serving.metrics import Metrics
from dbtrimkv.reporting.stats_text import budget_words, entries, kv_bound


@pytest.fixture(scope="module")
def recall():
    return dbtrimkv.load_model("tiny-recall")


@pytest.fixture(scope="module")
def answer(recall):
    """tiny-recall's own default (M = 32: 192 entries) on one digit image: the cache sits above the budget,
    below the bound, with no eviction (what read as 'the budget is not honoured')."""
    model, processor = recall
    pipe = DBTrimKVPipeline(model, processor)
    return pipe.chat("which digit?", images=["demos/examples/digit-911.png"], max_new_tokens=3, progress=False)


def test_the_summary_says_what_an_entry_is_the_bound_and_when_eviction_runs(answer):
    s = answer.stats
    assert (s.layers, s.kv_heads, s.budget) == (3, 2, 192)
    assert s.kv_bound == 192 + 6 * max(s.buffer_size, s.prefill_chunk) == kv_bound(192, 3, 2, 32, 2048)
    assert s.kv_entries > s.budget and s.evictions == 0 and s.kv_entries <= s.kv_bound
    text = s.summary()
    assert "an entry is one token's K and V in one layer and KV head: 3 layers x 2 KV heads = 6 entries per token" \
        in text
    assert f"budget + 6 x max(buffer 32, prefill chunk 2048) = {s.kv_bound} entries" in text
    assert f"until then it may hold more than the budget (now {s.kv_entries})" in text
    assert f"peak {s.peak_kv_entries}" in text


def test_storage_allocated_is_told_apart_from_what_entries_use(answer):
    s = answer.stats
    assert s.kv_storage_bytes >= s.kv_bytes and s.entry_bytes == s.kv_bytes // s.kv_entries
    line = next(line for line in s.explanation() if line.startswith("storage:"))
    assert re.search(r"allocated \(room for (\d+) entries\)", line).group(1) == str(s.kv_storage_bytes // s.entry_bytes)
    assert "used now" in line and "never past the bound" in line
    d = s.to_dict()
    assert d["kv_bound"] == s.kv_bound and d["explanation"] == s.explanation()


def test_one_entry_is_singular():
    assert entries(1) == "1 entry" and entries(2) == "2 entries" and budget_words(1, "global") == "budget 1 entry"
    stats = GenerationStats({"text": 1, "image": 0, "video": 0}, 0, {"text": 1, "image": 0, "video": 0}, 1, 6, 8,
                            48, 8, 1, 0.0, 0.0, 0, 1, "global", layers=3, kv_heads=2, buffer_size=0,
                            prefill_chunk=1, kv_bound=7)
    assert "budget 1 entry," in stats.summary() and "budget 1 entries" not in stats.summary()
    assert "= 7 entries" in stats.summary()


def test_no_budget_is_explained():
    stats = GenerationStats({"text": 4, "image": 0, "video": 0}, 0, {"text": 4, "image": 0, "video": 0}, 24, 24, 96,
                            96, 96, 24, 0.0, 0.0, 0, None, "global", layers=3, kv_heads=2, buffer_size=32,
                            prefill_chunk=64)
    assert "budget none (full cache)" in stats.summary() and "nothing is evicted" in stats.summary()


def test_budget_help_says_what_an_entry_is_and_the_bound(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an entry is one token's K and V in one layer and KV head" in text
    assert "budget + layers x KV heads x max(buffer size, prefill chunk)" in text
    assert "cache entries kept per sequence" not in text


def test_budget_tight_is_tighter_than_the_default_on_every_model(recall):
    model, _ = recall
    default, tight = resolve_eviction(model), resolve_eviction(model, "budget-tight")
    assert (default.memory_size, tight.memory_size) == (32, 8)  # tiny-recall: a quarter of its own default
    assert resolve_eviction(None, "budget-tight").memory_size == 128  # the library default, M = 512
    assert resolve_eviction(model, "budget-long-video").memory_size == 128  # four times
    args = build_parser().parse_args(["chat", "--config", "budget-tight", "q"])
    assert eviction_config(args, model).memory_size < resolve_eviction(model).memory_size
    assert resolve_eviction(model, {"budget_scale": 0.5}).memory_size == 16
    assert dbtrimkv.DBTrimKVConfig(budget=1000).replace(budget_scale=0.1).budget == 100


@pytest.mark.parametrize("layer, message", [
    ({"budget_scale": 0}, "budget_scale must be a number"),
    ({"budget_scale": "x"}, "budget_scale must be a number"),
    ({"budget_scale": 0.5, "budget": 10}, "not both"),
])
def test_budget_scale_is_checked(layer, message):
    from dbtrimkv.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_eviction(None, layer)


def test_budget_scale_needs_a_budget_to_scale():
    from dbtrimkv.errors import ConfigError

    with pytest.raises(ConfigError, match="has none"):
        dbtrimkv.DBTrimKVConfig().replace(budget_scale=0.5)  # a full cache has no budget to scale


def test_the_demo_panel_explains_the_numbers(answer):
    gradio_demo = pytest.importorskip("dbtrimkv.demos.gradio_demo")
    panel = gradio_demo.stats_markdown(answer.stats)
    assert "What the numbers mean" in panel and "one token's K and V in one layer and KV head" in panel
    assert f"= {answer.stats.kv_bound} entries" in panel and "allocated" in panel


def test_metrics_help_words_the_bound():
    help_text = Metrics.HELP["kv_request_bound_slots"][1]
    assert "budget + layers x KV heads x max(buffer, prefill chunk)" in help_text
    assert "one token's K and V in one layer and KV head" in Metrics.HELP["kv_pool_slots"][1]
