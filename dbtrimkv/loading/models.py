"""Resolve a model name to `(model, processor)` on the requested device and dtype.

Why: users name models in several ways (the embedded tiny default, a local directory, a hub id
that may already be in the hub cache) and expect one clear error when a name cannot be resolved
or the architecture is not supported. Gate checkpoints are handled by `dbtrimkv.loading.checkpoints`,
which builds on this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from ..errors import ModelLoadError
from .tiny import build_tiny

logger = logging.getLogger(__name__)

# Names of the embedded tiny models with random weights (built from configs: tests, recipes' smoke runs).
TINY_ALIASES = {"tiny": "qwen3_vl", "tiny-moe": "qwen3_vl_moe", "tiny-text": "qwen3"}
# Models shipped inside the package: `tiny-recall`, the tiny Qwen3-VL trained on the synthetic recall
# task (`dbtrimkv eval train-recall`) with its trained gates (`dbtrimkv eval train-gates`).
ASSETS = Path(__file__).parent.parent / "assets"
SHIPPED_MODELS = {"tiny-recall": ASSETS / "tiny-recall"}
DEFAULT_MODEL = "tiny-recall"
MULTIMODAL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)} or auto")
    return names[dtype]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory for a model name: the path itself, or a hub snapshot (cache first)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[str(name_or_path)]
        if not (shipped / "config.json").is_file():
            raise ModelLoadError(f"the shipped model {name_or_path!r} is missing from {shipped}: reinstall dbtrimkv "
                                 "(pip install -e .) or pass --model")
        return shipped
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; expected a model directory")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        known = ", ".join(sorted([*TINY_ALIASES, *SHIPPED_MODELS]))
        raise ModelLoadError(
            f"unknown model {name!r}: not a local directory, not a hub id (org/name), not one of: {known}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache; try the network below
        pass
    try:
        return Path(snapshot_download(name))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot find model {name!r}: not a local directory, not in the Hugging Face cache, "
            f"and downloading it failed ({reason})"
        ) from None


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} is not a model directory: it has no config.json")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def unpickling_refusal(path, exc: Exception) -> str | None:
    """The message for a pickle that `weights_only=True` refused (objects other than tensors), else None.

    torch words the refusal differently across releases ("Unsupported global: GLOBAL x" before 2.13,
    "Trying to load unsupported GLOBAL x whose module y is blocked" since), but always as an
    `UnpicklingError` of the weights-only unpickler naming the GLOBAL it would have imported."""
    found = re.search(r"GLOBAL\s+([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    if found is None:
        return None
    return f"{path}: refusing to unpickle it: it holds objects other than tensors ({found.group(1)})"


def is_supported_text_decoder(model_type: str) -> bool:
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_pretrained(directory: Path, device: torch.device, dtype: torch.dtype):
    """`(model, processor)` from a transformers model directory (weights + processor files)."""
    config = read_config(directory)
    model_type = config.get("model_type", "")
    if model_type in MULTIMODAL_TYPES:
        model_cls, processor_cls = AutoModelForImageTextToText, AutoProcessor
    elif is_supported_text_decoder(model_type):
        model_cls, processor_cls = AutoModelForCausalLM, AutoTokenizer
    else:
        raise ModelLoadError(
            f"unsupported model type {model_type!r} in {directory}: dbtrimkv runs Qwen3-VL, Qwen3-VL-MoE and "
            "decoder-only language models"
        )

    check_config(directory)
    try:
        with quiet_weight_loading():
            model = model_cls.from_pretrained(directory, dtype=dtype)
        processor = processor_cls.from_pretrained(directory)
    except pickle.UnpicklingError as exc:
        refusal = unpickling_refusal(directory, exc)
        raise ModelLoadError(refusal or f"cannot load the model in {directory}: corrupt weights ({exc})") from None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ModelLoadError(f"cannot load the model in {directory}: {exc}") from None
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise ModelLoadError(f"cannot load the model in {directory}: its weights do not have the shapes its "
                             "config.json declares") from None
    return model.to(device).eval(), processor


def check_config(directory: Path) -> None:
    """ModelLoadError for a config.json that transformers' own config class refuses (field types, values)."""
    try:
        AutoConfig.from_pretrained(directory)
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ModelLoadError(f"{directory / 'config.json'} is not a valid model config: {detail}") from None


@contextlib.contextmanager
def quiet_weight_loading():
    """No "Loading weights" bar from a local directory (files are already here: it is noise before the
    answer); transformers' own setting is restored afterwards."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_base_model(name_or_path: str | os.PathLike | None = None, device=None, dtype=None):
    """`(model, processor)` without gates: a shipped or random tiny model, a local directory or a hub id."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if name in TINY_ALIASES and not Path(name).exists():
        model, processor = build_tiny(TINY_ALIASES[name], dtype=dtype)
        return model.to(device), processor
    return load_pretrained(resolve_model_dir(name), device, dtype)
