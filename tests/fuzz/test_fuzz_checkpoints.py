"""Fuzz: bad checkpoint metadata and weight files give a CheckpointError / ModelLoadError, never a traceback,
never a silent change of the budget, never an unpickled object or an absurd allocation."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

import dbtrimkv
from dbtrimkv.loading.checkpoints import GATES_JSON, GATES_WEIGHTS, RELEASED_WEIGHTS
from dbtrimkv.errors import CheckpointError, DBTrimKVError, ModelLoadError
from dbtrimkv.loading.tiny import build_tiny, save_tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(released-format dir, own-format dir) of the tiny Qwen3-VL with gates, both loadable."""
    root = tmp_path_factory.mktemp("ckpt")
    base = save_tiny(root / "base", "qwen3_vl")
    model, _ = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    eviction = dbtrimkv.DBTrimKVConfig(memory_size=16)
    released = dbtrimkv.export_released_format(model, root / "released", eviction=eviction, base_model=str(base))
    own = dbtrimkv.save_gates(model, root / "own", eviction=eviction, base_model=str(base))
    return released, own


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


RELEASED_CONFIG_CASES = {
    "no-gate-type": lambda c: c.pop("retention_gate"),
    "gate-type-int": lambda c: c.update(retention_gate=3),
    "gate-type-list": lambda c: c.update(retention_gate=["rg10"]),
    "gate-type-unknown": lambda c: c.update(retention_gate="rg99"),
    **{f"intermediate-{name}": (lambda v: lambda c: c.update(retention_gate_intermediate_size=v))(v)
       for name, v in [("zero", 0), ("negative", -4), ("string", "512"), ("float", 16.5), ("huge", 10**12),
                       ("bool", True), ("null", None), ("wide", 10**6)]},
    **{f"bias-{name}": (lambda v: lambda c: c.update(retention_gate_bias_init=v))(v)
       for name, v in [("string", "x"), ("null", None), ("huge", 1e300), ("list", [1])]},
    **{f"tie-{name}": (lambda v: lambda c: c.update(tie_retention_gate_layers=v))(v)
       for name, v in [("string", "yes"), ("int", 2), ("null", None)]},
    **{f"memory-{name}": (lambda v: lambda c: c.update(memory_size=v))(v)
       for name, v in [("zero", 0), ("null", None), ("negative", -1), ("string", "512"), ("float", 1.5),
                       ("huge", 10**15), ("bool", False)]},
    **{f"buffer-{name}": (lambda v: lambda c: c.update(buffer_size=v))(v)
       for name, v in [("negative", -1), ("string", "32"), ("huge", 10**9), ("null", None)]},
    **{f"base-{name}": (lambda v: lambda c: c.update(base_model=v))(v)
       for name, v in [("missing", None), ("int", 5), ("list", ["a"]), ("dict", {"a": 1}), ("empty", ""),
                       ("nowhere", "/no/such/model/dir")]},
}


@pytest.mark.parametrize("case", sorted(RELEASED_CONFIG_CASES))
def test_bad_released_metadata(tmp_path, checkpoints, case):
    directory = shutil.copytree(checkpoints[0], tmp_path / "c")
    config = json.loads((directory / "config.json").read_text())
    RELEASED_CONFIG_CASES[case](config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DBTrimKVError):
        dbtrimkv.load_model(directory)


CONFIG_FILE_CASES = {"empty": b"", "list": b"[1, 2]", "null": b"null", "truncated": b'{"retention_gate": ',
                     "latin1": '{"base_model": "caf\xe9"}'.encode("latin-1"), "number": b"42", "nested": b"[" * 100000}


@pytest.mark.parametrize("case", sorted(CONFIG_FILE_CASES))
def test_bad_released_config_file(tmp_path, checkpoints, case):
    directory = shutil.copytree(checkpoints[0], tmp_path / "c")
    (directory / "config.json").write_bytes(CONFIG_FILE_CASES[case])
    with pytest.raises((CheckpointError, ModelLoadError)):
        dbtrimkv.load_model(directory)


def _weights(path, case: str) -> None:
    if case == "text":
        path.write_text("hello, this is a text file")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "evil-pickle":
        torch.save({"a": Evil()}, path)
    elif case == "raw-pickle":
        path.write_bytes(pickle.dumps(Evil()))
    elif case == "list":
        torch.save([torch.zeros(2)], path)
    elif case == "nested":
        torch.save({"model.language_model.layers.0.self_attn.retention_gate.bias": {"x": 1}}, path)
    elif case == "int-keys":
        torch.save({1: torch.zeros(2)}, path)
    elif case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "directory":
        path.unlink()
        path.mkdir()


WEIGHT_CASES = ["text", "empty", "evil-pickle", "raw-pickle", "list", "nested", "int-keys", "truncated", "directory"]


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_released_weights(tmp_path, checkpoints, case):
    directory = shutil.copytree(checkpoints[0], tmp_path / "c")
    _weights(directory / RELEASED_WEIGHTS, case)
    with pytest.raises(DBTrimKVError) as err:
        dbtrimkv.load_model(directory)
    if case == "evil-pickle":
        assert "refusing to unpickle" in str(err.value) and "system" in str(err.value)


def test_hostile_base_model_pickle_is_refused(tmp_path, checkpoints):
    released = shutil.copytree(checkpoints[0], tmp_path / "c")
    base = json.loads((released / "config.json").read_text())["base_model"]
    hostile = shutil.copytree(base, tmp_path / "base")
    (hostile / "model.safetensors").unlink()
    torch.save({"a": Evil()}, hostile / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        dbtrimkv.load_model(hostile)


OWN_CASES = {
    "no-format": lambda m: m.pop("format"),
    "no-gate-type": lambda m: m.pop("gate_type"),
    "no-intermediate": lambda m: m.pop("intermediate_size"),
    "intermediate-huge": lambda m: m.update(intermediate_size=10**12),
    "intermediate-string": lambda m: m.update(intermediate_size="16"),
    "eviction-list": lambda m: m.update(eviction=[1]),
    "eviction-bad-budget": lambda m: m.update(eviction={"budget": -1}),
    "eviction-unknown": lambda m: m.update(eviction={"colour": "red"}),
    "eviction-threshold-str": lambda m: m.update(eviction={"policy": "threshold", "threshold": "abc"}),
    "base-int": lambda m: m.update(base_model=3),
    "bias-str": lambda m: m.update(bias_init="x"),
    "tie-str": lambda m: m.update(tie_layers="no"),
}


@pytest.mark.parametrize("case", sorted(OWN_CASES))
def test_bad_own_metadata(tmp_path, checkpoints, case):
    directory = shutil.copytree(checkpoints[1], tmp_path / "g")
    meta = json.loads((directory / GATES_JSON).read_text())
    OWN_CASES[case](meta)
    (directory / GATES_JSON).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        dbtrimkv.load_model(directory)


@pytest.mark.parametrize("content", [b"", b"[]", b"\xff\xfe", b"{", b"null"])
def test_bad_own_json_file(tmp_path, checkpoints, content):
    directory = shutil.copytree(checkpoints[1], tmp_path / "g")
    (directory / GATES_JSON).write_bytes(content)
    with pytest.raises(CheckpointError):
        dbtrimkv.load_model(directory)


def test_bad_own_weights(tmp_path, checkpoints):
    directory = shutil.copytree(checkpoints[1], tmp_path / "g")
    (directory / GATES_WEIGHTS).write_text("not safetensors")
    with pytest.raises(CheckpointError):
        dbtrimkv.load_model(directory)


def test_valid_checkpoints_still_load_with_their_budget(checkpoints):
    for directory in checkpoints:
        model, _ = dbtrimkv.load_model(directory)
        assert dbtrimkv.loading.checkpoints.default_eviction_config(model).memory_size == 16


def _gate_tensors_cases():
    return {"sparse": lambda t: t.to_sparse(), "complex": lambda t: t.to(torch.complex64),
            "nan": lambda t: t.clone().fill_(float("nan")), "inf": lambda t: t.clone().fill_(float("inf")),
            "minus-inf": lambda t: torch.full_like(t, -float("inf")), "bool": lambda t: t > 0}


@pytest.mark.parametrize("case", sorted(_gate_tensors_cases()))
def test_gate_tensors_that_are_not_dense_real_finite_are_refused(tmp_path, checkpoints, case):
    directory = shutil.copytree(checkpoints[0], tmp_path / "c")
    state = torch.load(directory / RELEASED_WEIGHTS, weights_only=True)
    key = sorted(state)[0]
    state[key] = _gate_tensors_cases()[case](state[key])
    torch.save(state, directory / RELEASED_WEIGHTS)
    with pytest.raises(CheckpointError, match="gate weights must be") as err:
        dbtrimkv.load_model(directory)
    assert key.split("layers.")[-1] in str(err.value)


def test_own_format_gate_tensors_with_inf_are_refused(tmp_path, checkpoints):
    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(checkpoints[1], tmp_path / "g")
    state = load_file(str(directory / GATES_WEIGHTS))
    key = sorted(state)[-1]
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, str(directory / GATES_WEIGHTS))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        dbtrimkv.load_model(directory)


BASE_CONFIG_CASES = {  # config.json values transformers' own config classes refuse
    "hidden-size-string": lambda c: c["text_config"].update(hidden_size="abc"),
    "vocab-size-string": lambda c: c["text_config"].update(vocab_size="x"),
    "layer-types-unknown": lambda c: c["text_config"].update(layer_types=["bogus"]),
    "vision-depth-string": lambda c: c["vision_config"].update(depth="x"),
    "text-config-list": lambda c: c.update(text_config=[1]),
    "tie-string": lambda c: c.update(tie_word_embeddings="maybe"),
    "dtype-unknown": lambda c: c.update(dtype="float99"),
    "heads-mismatch-weights": lambda c: c["text_config"].update(num_attention_heads=3),
}


@pytest.mark.parametrize("case", sorted(BASE_CONFIG_CASES))
def test_base_config_that_transformers_refuses(tmp_path, checkpoints, case):
    base = json.loads((checkpoints[0] / "config.json").read_text())["base_model"]
    directory = shutil.copytree(base, tmp_path / "base")
    config = json.loads((directory / "config.json").read_text())
    BASE_CONFIG_CASES[case](config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is not a valid model config|do not have the shapes") as err:
        dbtrimkv.load_model(directory)
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
