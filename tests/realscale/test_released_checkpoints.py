"""Every released checkpoint's base model: a directory in the released layout (real key names and
gate shapes, `rg` and tied `rg10`, `trimkv_weights.pth` read with weights_only) loads onto a random
model of the real shape (depth truncated) and runs with eviction."""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, random_image
from released_layout import write_released_checkpoint

import dbtrimkv
from dbtrimkv.modeling.model_state import saved_eviction
from dbtrimkv.loading import shapes
from dbtrimkv.modeling.gates import text_attention_modules, text_config_of
from dbtrimkv.inputs.prompts import build_inputs

RELEASED = [(name, entry) for name in shapes.shape_names() for entry in shapes.load_shape(name)["released"]]


def test_every_released_base_has_a_shape():
    bases = {entry["name"].split("/")[1] for _, entry in RELEASED}
    assert {"DBTrimKV-Qwen3-VL-4B-Instruct", "DBTrimKV-Qwen3-VL-8B-Thinking", "DBTrimKV-Qwen3-4B-Math",
            "DBTrimKV-Qwen3-4B-Instruct-2507", "TrimKV-Qwen3-1.7B", "TrimKV-Qwen3-4B", "TrimKV-Qwen3-8B",
            "TrimKV-Qwen3-14B", "TrimKV-Phi-3-mini-128k-instruct"} <= bases


@pytest.mark.parametrize("shape, entry", RELEASED, ids=[e["name"].split("/")[1] for _, e in RELEASED])
def test_released_layout_loads_and_runs_with_eviction(tmp_path, shape, entry):
    layers = 2 if entry["name"].endswith("Qwen3-VL-4B-Instruct") else 1  # two layers show the rg10 tying
    directory, state = write_released_checkpoint(tmp_path, shape, entry, num_layers=layers, vocab_size=1024)
    model, processor = dbtrimkv.load_model(directory, dtype="bfloat16")
    text = text_config_of(model)
    real = shapes.load_shape(shape)["text"]
    assert (text.hidden_size, text.num_key_value_heads, text.num_hidden_layers) == (
        real["hidden_size"], real["num_key_value_heads"], layers)
    loaded = model.state_dict()
    for key, tensor in state.items():  # the real key names, loaded exactly
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key
    gates = [m.retention_gate for m in text_attention_modules(model)]
    if entry["retention_gate"] == "rg10":
        assert gates[0].linear1.weight.shape == (512, real["hidden_size"])
        assert gates[0].linear3.weight.shape == (real["num_key_value_heads"], 512)
        assert all(g.linear3 is gates[0].linear3 and g.bias is gates[0].bias for g in gates)  # tied calibration
    else:
        assert gates[0].linear2.weight.shape == (real["num_key_value_heads"], 512)
    eviction = saved_eviction(model)
    assert (eviction.memory_size, eviction.buffer_size) == (8, 4)
    chat = image_chat(random_image(4), "What is this?") if hasattr(model.config, "vision_config") else \
        "Say something about memory-bounded caches and their gates."
    inputs = build_inputs(processor, [chat])
    cache = dbtrimkv.DBTrimKVCache(model, eviction)
    out = dbtrimkv.generate(model, inputs, cache, max_new_tokens=4, min_new_tokens=4, prefill_chunk=16,
                            do_sample=False)
    assert out.shape == (1, 4)
    assert cache.num_evictions >= 1
    prompt = int(inputs["attention_mask"].sum())
    assert cache.seen[0] == prompt + 3  # the last sampled token is not fed back
    bound = cache.budget + cache.segments_per_sequence * 16
    assert cache.budget <= cache.num_entries(0) <= bound < cache.seen[0] * cache.segments_per_sequence


@pytest.mark.parametrize("name", shapes.shape_names())
def test_shape_configs_hold_their_public_values(name):
    shape = shapes.load_shape(name)
    config = shapes.build_config(name)
    text = config.get_text_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(text, key) == shape["text"][key], key
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == shape["text"].get("head_dim", 96)
    if "vision_config" in config.to_dict():
        vision = config.vision_config
        assert vision.out_hidden_size == text.hidden_size
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        small = shapes.build_config(name, num_layers=2, vision_depth=3).vision_config
        assert small.depth == 3 and len(small.deepstack_visual_indexes) == len(vision.deepstack_visual_indexes)
        processor = shapes.build_processor(name)
        assert processor.image_processor.size == {"shortest_edge": 65536, "longest_edge": 16777216}
        assert processor.video_processor.max_frames == 768 and processor.video_processor.min_frames == 4


def test_unknown_shape_and_bad_depth_are_clear_errors():
    from dbtrimkv.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model shape"):
        shapes.load_shape("qwen9-vl")
    with pytest.raises(ConfigError, match="num_layers must be in"):
        shapes.build_config("qwen3-4b", num_layers=99)
