"""Released-format and own-format gate checkpoints load exactly; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_gates

import dbtrimkv
from dbtrimkv.loading.checkpoints import RELEASED_WEIGHTS
from dbtrimkv.errors import CheckpointError, ConfigError
from dbtrimkv.modeling.gates import gate_outputs, text_attention_modules
from dbtrimkv.loading.tiny import build_tiny, save_tiny


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("base"), "qwen3_vl")


@pytest.fixture(scope="module")
def text_base_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("text_base"), "qwen3")


def _released_dir(tmp_path, base_dir, gate_type, prefix="model.language_model.", tie=True, seed=0,
                  intermediate=24, mutate=None):
    """A directory in the released format, written by hand with the official key names."""
    model, _ = build_tiny("qwen3_vl")
    text = model.config.text_config
    hidden, heads, layers = text.hidden_size, text.num_key_value_heads, text.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    state = {}
    shared = {"linear3.weight": torch.randn(heads, intermediate, generator=gen) * 0.3,
              "bias": torch.randn(heads, generator=gen) + 1.0}
    for layer in range(layers):
        key = f"{prefix}layers.{layer}.self_attn.retention_gate."
        state[key + "linear1.weight"] = torch.randn(intermediate, hidden, generator=gen) * 0.2
        state[key + "linear1.bias"] = torch.randn(intermediate, generator=gen) * 0.1
        if gate_type == "rg":
            state[key + "linear2.weight"] = torch.randn(heads, intermediate, generator=gen) * 0.3
            state[key + "bias"] = torch.randn(heads, generator=gen) + 1.0
        else:
            state[key + "linear2.weight"] = torch.randn(intermediate, intermediate, generator=gen) * 0.2
            state[key + "linear2.bias"] = torch.randn(intermediate, generator=gen) * 0.1
            for name, value in shared.items():
                state[key + name] = value.clone() if tie else torch.randn(value.shape, generator=gen)
    if mutate:
        state = mutate(state)
    config = model.config.to_dict()
    config.update(base_model=str(base_dir), retention_gate=gate_type, retention_gate_intermediate_size=intermediate,
                  retention_gate_bias_init=18.0, tie_retention_gate_layers=tie, memory_size=128, buffer_size=64,
                  trainable_params="self_attn.retention_gate")
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config, default=str))
    torch.save(state, tmp_path / RELEASED_WEIGHTS)
    return tmp_path, state


def _expected_log_beta(state, gate_type, hidden, prefix="model.language_model."):
    out = []
    for layer in range(3):
        g = lambda name: state[f"{prefix}layers.{layer}.self_attn.retention_gate.{name}"]  # noqa: E731
        h = torch.nn.functional.silu(hidden @ g("linear1.weight").T + g("linear1.bias"))
        if gate_type == "rg":
            logits = h @ g("linear2.weight").T + g("bias")
        else:
            h = torch.nn.functional.silu(h @ g("linear2.weight").T + g("linear2.bias"))
            logits = h @ g("linear3.weight").T + g("bias")
        out.append(torch.nn.functional.logsigmoid(logits))
    return torch.stack(out)


@pytest.mark.parametrize("gate_type", ["rg", "rg10"])
def test_released_checkpoint_loads_exactly(tmp_path, base_dir, gate_type):
    directory, state = _released_dir(tmp_path / "ckpt", base_dir, gate_type)
    model, processor = dbtrimkv.load_model(directory)
    hidden = torch.randn(2, 5, 64)
    torch.testing.assert_close(gate_outputs(model, hidden), _expected_log_beta(state, gate_type, hidden),
                               rtol=1e-5, atol=1e-6)
    defaults = dbtrimkv.loading.checkpoints.default_eviction_config(model)
    assert defaults.memory_size == 128 and defaults.buffer_size == 64
    assert hasattr(processor, "image_processor")
    if gate_type == "rg10":
        gates = [m.retention_gate for m in text_attention_modules(model)]
        assert all(g.linear3.weight is gates[0].linear3.weight and g.bias is gates[0].bias for g in gates)


def test_text_model_released_checkpoint_with_text_key_prefix(tmp_path, text_base_dir):
    directory, state = _released_dir(tmp_path / "ckpt", text_base_dir, "rg10", prefix="model.")
    config = json.loads((directory / "config.json").read_text())
    model, _ = dbtrimkv.load_model(directory)
    assert config["base_model"] == str(text_base_dir)
    hidden = torch.randn(1, 4, 64)
    torch.testing.assert_close(gate_outputs(model, hidden), _expected_log_beta(state, "rg10", hidden, "model."),
                               rtol=1e-5, atol=1e-6)


def test_save_gates_round_trip(tmp_path, base_dir):
    with pytest.warns(UserWarning, match="untrained"):
        model, _ = dbtrimkv.load_model(base_dir)
    randomize_gates(model, seed=4)
    eviction = dbtrimkv.DBTrimKVConfig(memory_size=64, policy="layer")
    dbtrimkv.save_gates(model, tmp_path / "gates", eviction=eviction, base_model=str(base_dir))
    loaded, _ = dbtrimkv.load_model(tmp_path / "gates")
    hidden = torch.randn(1, 6, 64)
    assert torch.equal(gate_outputs(model, hidden), gate_outputs(loaded, hidden))
    assert dbtrimkv.loading.checkpoints.default_eviction_config(loaded) == eviction
    gates = [m.retention_gate for m in text_attention_modules(loaded)]
    assert gates[1].linear3.weight is gates[2].linear3.weight
    # and the export to the released format reads back identically
    dbtrimkv.export_released_format(model, tmp_path / "released", base_model=str(base_dir))
    again, _ = dbtrimkv.load_model(tmp_path / "released")
    assert torch.equal(gate_outputs(model, hidden), gate_outputs(again, hidden))


def test_plain_model_gets_fresh_gates_with_a_warning(base_dir):
    with pytest.warns(UserWarning, match="untrained"):
        model, _ = dbtrimkv.load_model(base_dir)
    assert not dbtrimkv.loading.checkpoints.gates_are_trained(model)


class NotATensor:
    pass


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: {**s, "model.language_model.layers.9.self_attn.retention_gate.linear1.weight": torch.zeros(1)},
         "match no retention gate"),
        (lambda s: {k: v for k, v in s.items() if "layers.1." not in k}, "missing gate weights"),
        (lambda s: {k: (v[:, :-1] if k.endswith("layers.0.self_attn.retention_gate.linear1.weight") else v)
                    for k, v in s.items()}, "has shape"),
        (lambda s: {**s, "model.language_model.layers.0.self_attn.retention_gate.bias": NotATensor()},
         "refusing to unpickle"),
        (lambda s: {**s, "model.language_model.layers.0.self_attn.retention_gate.bias": "text"}, "not tensors"),
        (lambda s: {k: (v + 1 if k.endswith("layers.2.self_attn.retention_gate.bias") else v) for k, v in s.items()},
         "differs across layers"),
    ],
    ids=["unknown-key", "missing-key", "shape", "pickled-object", "non-tensor", "untied-calibration"],
)
def test_bad_released_checkpoints_fail_clearly(tmp_path, base_dir, mutate, message):
    directory, _ = _released_dir(tmp_path / "ckpt", base_dir, "rg10", mutate=mutate)
    with pytest.raises(CheckpointError, match=message):
        dbtrimkv.load_model(directory)


def test_bad_config_fields_fail_clearly(tmp_path, base_dir):
    directory, _ = _released_dir(tmp_path / "ckpt", base_dir, "rg10")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "retention_gate": "rg99"}))
    with pytest.raises(CheckpointError, match="retention_gate"):
        dbtrimkv.load_model(directory)
    (directory / "config.json").write_text(json.dumps({**config, "base_model": None}))
    with pytest.raises(CheckpointError, match="base_model"):
        dbtrimkv.load_model(directory)
    (directory / RELEASED_WEIGHTS).write_bytes(b"definitely not a zip or pickle")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a readable"):
        dbtrimkv.load_model(directory)


def test_attach_is_idempotent_and_rejects_conflicting_specs():
    model, _ = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    gate = text_attention_modules(model)[0].retention_gate
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    assert text_attention_modules(model)[0].retention_gate is gate
    hooks = len(text_attention_modules(model)[0]._forward_pre_hooks)
    assert hooks == 1
    with pytest.raises(ConfigError, match="already attached"):
        dbtrimkv.attach_retention_gates(model, gate_type="rg", intermediate_size=16)


def test_cache_requires_gates():
    model, _ = build_tiny("qwen3")
    with pytest.raises(ConfigError, match="attach_retention_gates"):
        dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=100))


def test_vision_tower_keeps_sdpa():
    model, _ = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    assert model.config.text_config._attn_implementation == "dbtrimkv"
    assert model.config.vision_config._attn_implementation == "sdpa"
