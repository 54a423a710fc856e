"""One rule decides a cache's eviction settings: model's saved default -> preset/file -> explicit
arguments, where an explicit argument overrides only what the caller set."""

from __future__ import annotations

import pytest
import yaml

import dbtrimkv
from dbtrimkv.cli import build_parser
from dbtrimkv.commands.common import eviction_config
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import ConfigError
from dbtrimkv.settings.eviction_settings import default_eviction_config, library_default, resolve_eviction
from dbtrimkv.pipeline import DBTrimKVPipeline
from dbtrimkv.loading.tiny import save_tiny


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("text_base"), "qwen3")


@pytest.fixture(scope="module")
def saved_with_default(tmp_path_factory, text_base):
    """Gates saved with a non-default eviction (buffer 7, M 5, policy layer)."""
    with pytest.warns(UserWarning, match="untrained"):
        model, _ = dbtrimkv.load_model(text_base)
    directory = tmp_path_factory.mktemp("gates")
    dbtrimkv.save_gates(model, directory, eviction=DBTrimKVConfig(memory_size=5, buffer_size=7, policy="layer"),
                        base_model=str(text_base))
    return directory


def test_from_pretrained_keeps_the_policy_of_a_config_object():
    pipe = DBTrimKVPipeline.from_pretrained("tiny-text", config=DBTrimKVConfig(policy="streaming", budget=40))
    assert (pipe.config.policy, pipe.config.budget) == ("streaming", 40)
    assert pipe.new_cache().policy.name == "streaming"


def test_from_pretrained_keeps_policy_and_tau_of_a_yaml_file(tmp_path):
    head = tmp_path / "head.yaml"
    head.write_text(yaml.safe_dump({"eviction": {"policy": "head", "memory_size": 4}}))
    assert DBTrimKVPipeline.from_pretrained("tiny-text", config=str(head)).config.policy == "head"
    threshold = tmp_path / "threshold.yaml"
    threshold.write_text(yaml.safe_dump({"eviction": {"policy": "threshold", "threshold": 0.05, "memory_size": 8}}))
    pipe = DBTrimKVPipeline.from_pretrained("tiny-text", config=threshold)
    assert (pipe.config.policy, pipe.config.threshold, pipe.config.memory_size) == ("threshold", 0.05, 8)
    assert pipe.new_cache().policy.threshold == 0.05
    # an explicit keyword overrides only itself
    pipe = DBTrimKVPipeline.from_pretrained("tiny-text", config=threshold, memory_size=2)
    assert (pipe.config.policy, pipe.config.threshold, pipe.config.memory_size) == ("threshold", 0.05, 2)


def test_save_gates_without_settings_reloads_with_the_library_default(tmp_path, text_base):
    with pytest.warns(UserWarning, match="untrained"):
        model, _ = dbtrimkv.load_model(text_base)
    assert default_eviction_config(model) == library_default()  # no saved default: the library's
    dbtrimkv.save_gates(model, tmp_path / "gates", base_model=str(text_base))
    loaded, processor = dbtrimkv.load_model(tmp_path / "gates")
    assert default_eviction_config(loaded) == library_default()
    assert DBTrimKVPipeline(loaded, processor).config == library_default()
    assert not library_default().unbounded


def test_the_saved_default_is_the_first_layer_everywhere(saved_with_default):
    model, processor = dbtrimkv.load_model(saved_with_default)
    saved = DBTrimKVConfig(memory_size=5, buffer_size=7, policy="layer")
    assert DBTrimKVPipeline(model, processor).config == saved
    assert eviction_config(build_parser().parse_args(["chat", "hi"]), model) == saved
    # a preset names budget_scale, buffer_size, policy and prefill_chunk: lookahead / min_per_head stay saved,
    # and budget-tight is a quarter of the saved M = 5 (at least 1), tighter than the model's default
    tight = resolve_eviction(model, "budget-tight", min_per_head=None)
    assert (tight.memory_size, tight.buffer_size, tight.policy) == (1, 32, "global")
    # explicit settings override only themselves
    budget = resolve_eviction(model, budget=300)
    assert (budget.budget, budget.memory_size, budget.buffer_size, budget.policy) == (300, None, 7, "layer")
    args = build_parser().parse_args(["chat", "--prefill-chunk", "16", "hi"])
    assert eviction_config(args, model) == DBTrimKVConfig(memory_size=5, buffer_size=7, policy="layer", prefill_chunk=16)
    assert eviction_config(build_parser().parse_args(["chat", "--full-cache", "hi"]), model).unbounded


def test_layers_combine_before_validation(tmp_path):
    """A file may choose the threshold policy and the command line give its tau."""
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"policy": "threshold"}))
    config = resolve_eviction(config=path, threshold=0.2)
    assert (config.policy, config.threshold) == ("threshold", 0.2)
    with pytest.raises(ConfigError, match="threshold tau"):
        resolve_eviction(config=path)
    # choosing another policy drops the previous one's tau and options
    assert resolve_eviction(config=DBTrimKVConfig(policy="threshold", threshold=0.3), policy="head").threshold is None
    snap = resolve_eviction(policy="snapkv", policy_options={"window": 4})
    assert resolve_eviction(config=snap, policy="streaming").policy_options == {}
    assert resolve_eviction(config=snap, policy_options={"kernel": 3}).policy_options == {"window": 4, "kernel": 3}
    with pytest.raises(ConfigError, match="unknown eviction setting"):
        resolve_eviction(budgett=3)
