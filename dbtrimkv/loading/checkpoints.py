"""Load and save retention gates: released TrimKV / DBTrimKV checkpoints and our own format.

Why: users arrive with (a) a released checkpoint directory (`config.json` = base config plus
`base_model`, `retention_gate`, `memory_size`, ... and `trimkv_weights.pth`, a state dict of gate
tensors only), (b) gates trained with `dbtrimkv train` (`save_gates`: safetensors + a small JSON),
or (c) a plain Qwen3-VL / Qwen3 model. `load_model` handles all three and never unpickles arbitrary
objects (`torch.load(..., weights_only=True)`); keys or shapes that do not fit, or a pickle holding
anything but tensors, are clear `CheckpointError`s.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from safetensors.torch import load_file

from ..settings.config import MAX_BUFFER_SIZE, MAX_MEMORY_SIZE, DBTrimKVConfig
from ..errors import CheckpointError, ConfigError
from ..settings.eviction_settings import default_eviction_config
from ..modeling.gates import GATE_TYPES, attach_retention_gates, gate_parameters, gate_spec_of
from .models import DEFAULT_MODEL, TINY_ALIASES, load_base_model, read_config, resolve_model_dir, unpickling_refusal
from ..modeling.model_anatomy import text_attention_modules, text_config_of
from ..modeling.model_state import existing_state, model_state

logger = logging.getLogger(__name__)

RELEASED_WEIGHTS = "trimkv_weights.pth"
GATES_JSON = "dbtrimkv_gates.json"
GATES_WEIGHTS = "dbtrimkv_gates.safetensors"
FORMAT = "dbtrimkv-gates"
_GATE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.retention_gate\.([A-Za-z0-9_.]+)$")
_SHARED = ("linear3.weight", "bias")  # the calibration projection of a tied rg10 gate
UNTRAINED_WARNING = "retention gates are untrained (freshly initialised): eviction decisions are blind"


# --- saving --------------------------------------------------------------------------------------
def _prepare_output(model, directory: str | Path):
    """(gate spec, created directory, CPU copies of the gate tensors by full name)."""
    spec = gate_spec_of(model)
    if spec is None:
        raise CheckpointError("the model has no retention gates to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").clone().contiguous() for name, p in gate_parameters(model).items()}
    return spec, directory, tensors


def _base_model_name(model, base_model: str | None) -> str:
    state = existing_state(model)
    return base_model or (state.base_model if state is not None else None) or model.config._name_or_path


def save_gates(model, directory: str | Path, eviction: DBTrimKVConfig | None = None,
               base_model: str | None = None) -> Path:
    """Write the gate weights (safetensors) and a JSON describing them; returns the directory.
    `eviction` (default: the model's saved default, else the library default) is what a later
    `load_model` + pipeline / CLI uses when given no settings."""
    spec, directory, tensors = _prepare_output(model, directory)
    save_file(tensors, str(directory / GATES_WEIGHTS))
    text = text_config_of(model)
    meta = {
        "format": FORMAT,
        "version": 1,
        **spec.to_dict(),
        "base_model": _base_model_name(model, base_model),
        "num_layers": text.num_hidden_layers,
        "num_kv_heads": text.num_key_value_heads,
        "hidden_size": text.hidden_size,
        "eviction": (eviction or default_eviction_config(model)).to_dict(),
    }
    (directory / GATES_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def export_released_format(model, directory: str | Path, eviction: DBTrimKVConfig | None = None,
                           base_model: str | None = None) -> Path:
    """Write `config.json` + `trimkv_weights.pth` in the layout of the released checkpoints."""
    spec, directory, tensors = _prepare_output(model, directory)
    eviction = eviction or default_eviction_config(model)
    text = text_config_of(model)
    config = model.config.to_dict()
    memory = eviction.memory_size
    if memory is None and eviction.budget is not None:
        memory = eviction.budget // (text.num_hidden_layers * text.num_key_value_heads)
    config.update(
        base_model=_base_model_name(model, base_model),
        retention_gate=spec.gate_type, retention_gate_intermediate_size=spec.intermediate_size,
        retention_gate_bias_init=spec.bias_init, tie_retention_gate_layers=spec.tie_layers,
        buffer_size=eviction.buffer_size, trainable_params="self_attn.retention_gate",
    )
    if memory is not None:  # an unbounded eviction states no memory_size (0 / null are refused on load)
        config["memory_size"] = memory
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    torch.save(tensors, directory / RELEASED_WEIGHTS)
    return directory


# --- loading -------------------------------------------------------------------------------------
def load_model(name_or_path: str | Path | None = None, device=None, dtype=None, gate_type: str = "rg10",
               intermediate_size: int = 512):
    """`(model, processor)` with retention gates attached and loaded.

    `name_or_path`: a released TrimKV / DBTrimKV checkpoint (directory or hub id), a directory
    written by `save_gates` (or holding a model plus such gates), a plain Qwen3-VL / Qwen3 model
    (fresh gates, with a warning), `tiny-recall` / None (the shipped default, trained gates), or
    `tiny` / `tiny-moe` / `tiny-text` (random weights, fresh gates).
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    directory = _model_directory(name)
    if directory is not None and (directory / RELEASED_WEIGHTS).is_file():
        return _load_released(directory, device, dtype)
    if directory is not None and (directory / GATES_JSON).is_file():
        return _load_own(directory, device, dtype)
    model, processor = load_base_model(name, device=device, dtype=dtype)
    attach_retention_gates(model, gate_type=gate_type, intermediate_size=intermediate_size)
    state = model_state(model)
    state.gates_trained, state.base_model = False, name
    if name not in TINY_ALIASES:
        warnings.warn(f"{name}: {UNTRAINED_WARNING}; load a TrimKV/DBTrimKV checkpoint for learned eviction",
                      stacklevel=2)
    return model, processor


def _model_directory(name: str) -> Path | None:
    """The local directory of a model name; None for the random tiny models built from configs."""
    return None if name in TINY_ALIASES and not Path(name).exists() else resolve_model_dir(name)


def holds_gates(name: str) -> bool:
    """Whether `load_model(name)` would load trained gates (a released or a `save_gates` checkpoint)."""
    directory = _model_directory(name)
    return directory is not None and ((directory / RELEASED_WEIGHTS).is_file() or (directory / GATES_JSON).is_file())


def _resolve_base(directory: Path, base_model) -> str:
    if not base_model:
        raise CheckpointError(f"{directory}: the checkpoint does not name its base_model")
    if not isinstance(base_model, str):
        raise CheckpointError(f"{directory}: base_model must be a model name or path, got {base_model!r}")
    local = Path(base_model)
    if not local.is_absolute() and (directory / local).is_dir():
        return str((directory / local).resolve())
    return str(base_model)


MAX_GATE_INTERMEDIATE = 65536  # and at most GATE_WIDTH_PER_HIDDEN x the model's hidden size
GATE_WIDTH_PER_HIDDEN = 8


def _hidden_size(config: dict) -> int | None:
    for section in (config.get("text_config"), config):
        if isinstance(section, dict) and _is_count(section.get("hidden_size")):
            return section["hidden_size"]
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _checked_int(source: str, key: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CheckpointError(f"{source}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def gate_settings(source: str, meta: dict, keys: dict[str, str], hidden_size: int | None) -> dict:
    """The gate constructor arguments a checkpoint's metadata describes, each one checked (type and
    bounds, the width relative to the hidden size) before anything is allocated.

    `keys` maps gate_type / intermediate_size / bias_init / tie_layers to the metadata's key names."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    gate_type = meta.get(keys["gate_type"])
    if gate_type not in GATE_TYPES:
        raise CheckpointError(f"{source}: {keys['gate_type']} must be one of {', '.join(GATE_TYPES)}, "
                              f"got {gate_type!r}")
    high = MAX_GATE_INTERMEDIATE if hidden_size is None else min(MAX_GATE_INTERMEDIATE,
                                                                  GATE_WIDTH_PER_HIDDEN * hidden_size)
    size = _checked_int(source, keys["intermediate_size"], meta.get(keys["intermediate_size"], 512), 1, high)
    bias = meta.get(keys["bias_init"], 18.0)
    if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias) or abs(bias) > 1e4:
        raise CheckpointError(f"{source}: {keys['bias_init']} must be a finite number, got {bias!r}")
    tie = meta.get(keys["tie_layers"], gate_type == "rg10")
    if not isinstance(tie, bool):
        raise CheckpointError(f"{source}: {keys['tie_layers']} must be true or false, got {tie!r}")
    return dict(gate_type=gate_type, intermediate_size=size, bias_init=float(bias), tie_layers=tie)


def released_eviction(source: str, config: dict) -> DBTrimKVConfig:
    """The eviction a released checkpoint was trained for: memory_size M per head and buffer_size.
    A memory_size that is present but 0, null or not a positive integer is an error: it must not
    silently turn the budget off."""

    memory = None
    if "memory_size" in config:
        memory = _checked_int(source, "memory_size", config["memory_size"], 1, MAX_MEMORY_SIZE)
    buffer = _checked_int(source, "buffer_size", config.get("buffer_size", 32), 0, MAX_BUFFER_SIZE)
    return DBTrimKVConfig(memory_size=memory, buffer_size=buffer)


RELEASED_KEYS = dict(gate_type="retention_gate", intermediate_size="retention_gate_intermediate_size",
                     bias_init="retention_gate_bias_init", tie_layers="tie_retention_gate_layers")
OWN_KEYS = dict(gate_type="gate_type", intermediate_size="intermediate_size", bias_init="bias_init",
                tie_layers="tie_layers")


def _load_released(directory: Path, device, dtype):
    config = read_config(directory)
    source = f"{directory}/config.json"
    gates = gate_settings(source, config, RELEASED_KEYS, _hidden_size(config))
    eviction = released_eviction(source, config)
    base = _resolve_base(directory, config.get("base_model"))
    model, processor = load_base_model(base, device=device, dtype=dtype)
    attach_retention_gates(model, **gates)
    state = read_released_weights(directory / RELEASED_WEIGHTS)
    load_gate_state(model, state, source=str(directory / RELEASED_WEIGHTS))
    model_state(model).default_eviction = eviction
    _mark_loaded(model, base, directory)
    return model, processor


def _load_own(directory: Path, device, dtype):
    source = str(directory / GATES_JSON)
    try:
        meta = json.loads((directory / GATES_JSON).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{source}: not a dbtrimkv gates file (format={found!r})")
    for key in ("gate_type", "intermediate_size"):
        if key not in meta:
            raise CheckpointError(f"{source}: missing {key}")
    hidden = meta.get("hidden_size") if _is_count(meta.get("hidden_size")) else None
    gates = gate_settings(source, meta, OWN_KEYS, hidden)
    eviction = None
    if meta.get("eviction") is not None:
        try:
            eviction = DBTrimKVConfig.from_dict(meta["eviction"])
        except ConfigError as exc:
            raise CheckpointError(f"{source}: eviction: {exc}") from None
    base = _resolve_base(directory, meta.get("base_model"))
    model, processor = load_base_model(base, device=device, dtype=dtype)
    attach_retention_gates(model, **gates)
    try:
        state = load_file(str(directory / GATES_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {directory / GATES_WEIGHTS}: {exc}") from None
    load_gate_state(model, state, source=str(directory / GATES_WEIGHTS))
    if eviction is not None:
        model_state(model).default_eviction = eviction
    _mark_loaded(model, base, directory)
    return model, processor


def _mark_loaded(model, base: str, directory: Path) -> None:
    state = model_state(model)
    state.gates_trained, state.base_model, state.checkpoint = True, base, str(directory)


def read_released_weights(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` with clear errors; values must all be tensors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols; the outcome is reported below
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = unpickling_refusal(path, exc)
        if refusal:
            raise CheckpointError(refusal) from None
        raise CheckpointError(f"{path}: not a readable torch state dict (corrupt or not a torch.save file)") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            MemoryError) as exc:
        raise CheckpointError(f"{path}: not a readable torch state dict (corrupt or not a torch.save file: "
                              f"{type(exc).__name__} {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors named by strings: {', '.join(map(str, bad[:5]))}")
    return state


def load_gate_state(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy gate tensors into the model's gates, matching by layer index and parameter name."""
    spec = gate_spec_of(model)
    modules = text_attention_modules(model)
    expected = {}
    for layer, module in enumerate(modules):
        for name, param in module.retention_gate.named_parameters(remove_duplicate=False):
            expected[(layer, name)] = param
    given: dict[tuple[int, str], torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = _GATE_KEY.search(key)
        if match is None or (int(match.group(1)), match.group(2)) not in expected:
            unknown.append(key)
        else:
            given[(int(match.group(1)), match.group(2))] = tensor
    if unknown:
        raise CheckpointError(f"{source}: keys that match no retention gate of this model: {', '.join(unknown[:5])}"
                              + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    missing = [f"layers.{l}.self_attn.retention_gate.{n}" for (l, n) in expected if (l, n) not in given]
    if missing:
        raise CheckpointError(f"{source}: missing gate weights: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    for (layer, name), tensor in given.items():
        _check_gate_values(source, f"layers.{layer}.self_attn.retention_gate.{name}", tensor)
        if tuple(tensor.shape) != tuple(expected[(layer, name)].shape):
            raise CheckpointError(
                f"{source}: layers.{layer}.self_attn.retention_gate.{name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[(layer, name)].shape)} (gate type {spec.gate_type}, "
                f"intermediate size {spec.intermediate_size})"
            )
    if spec.tie_layers:
        for name in _SHARED:
            first = given[(0, name)]
            if any(not torch.equal(given[(l, name)], first) for l in range(len(modules))):
                raise CheckpointError(
                    f"{source}: retention_gate.{name} differs across layers, but the gates are tied "
                    "(tie_retention_gate_layers): the calibration projection must be shared"
                )
    with torch.no_grad():
        for key, tensor in given.items():
            param = expected[key]
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def _check_gate_values(source: str, name: str, tensor: torch.Tensor) -> None:
    """Gate weights must be dense, real and finite: anything else would load and then score garbage."""
    if tensor.layout != torch.strided:
        raise CheckpointError(f"{source}: {name} is a {tensor.layout} tensor; gate weights must be dense")
    if tensor.is_complex() or tensor.is_quantized or tensor.dtype == torch.bool:
        raise CheckpointError(f"{source}: {name} has dtype {tensor.dtype}; gate weights must be real numbers")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{source}: {name} holds NaN or infinite values; gate weights must be finite")


def gates_are_trained(model) -> bool:
    state = existing_state(model)
    return state is not None and state.gates_trained


def describe(model) -> str:
    """One line on where the model and its gates came from."""
    state = existing_state(model)
    base = (state.base_model if state is not None else None) or "?"
    if gates_are_trained(model):
        return f"{base} with trained gates from {state.checkpoint or '?'}"
    return f"{base} with untrained gates"

