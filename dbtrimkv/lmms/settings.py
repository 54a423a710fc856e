"""The `--model_args` of lmms-eval's `dbtrimkv` model, checked before anything loads.

Why: lmms-eval hands a model its `key=value,...` string as keyword arguments (numbers already
parsed, everything else a string). A misspelt key or a bad value must stop the run with one clear
sentence before a multi-GB checkpoint loads, and the eviction settings must be decided by the one
owner of that rule (`eviction_settings.resolve_eviction`), exactly as `dbtrimkv chat` decides them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..settings.eviction_settings import resolve_eviction
from ..loading.models import DEFAULT_MODEL, resolve_device, resolve_dtype
from ..inputs.prompts import VideoOptions

# eviction settings passed through to resolve_eviction (None = not set: the checkpoint's default wins)
EVICTION_ARGS = ("budget", "memory_size", "policy", "threshold", "policy_options", "buffer_size", "prefill_chunk",
                 "lookahead", "min_per_head")
# max_batch_size: lmms-eval passes it with --max_batch_size; accepted and unused (batches are batch_size)
OTHER_ARGS = ("pretrained", "config", "full_cache", "fps", "max_frames", "device", "dtype", "batch_size",
              "max_batch_size")
KNOWN_ARGS = EVICTION_ARGS + OTHER_ARGS


@dataclass
class ModelArgs:
    """What the `dbtrimkv` lmms-eval model was asked for (see `parse_model_args`)."""

    pretrained: str = DEFAULT_MODEL
    config: str | None = None  # a preset name or a YAML/JSON file of eviction settings
    full_cache: bool = False
    eviction: dict[str, Any] = field(default_factory=dict)  # explicit settings, None = not set
    video: VideoOptions = field(default_factory=VideoOptions)
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1

    def resolve(self, model=None) -> DBTrimKVConfig:
        """The cache settings for `model` (None: against the library default, to check them early)."""
        return resolve_eviction(model, self.config, full_cache=self.full_cache, **self.eviction)


def parse_model_args(**kwargs) -> ModelArgs:
    """Check lmms-eval's model args (`pretrained=tiny-recall,memory_size=16,...`); `ConfigError` on
    an unknown key or a bad value, before any model is loaded."""
    unknown = sorted(set(kwargs) - set(KNOWN_ARGS))
    if unknown:
        raise ConfigError(f"unknown dbtrimkv model arg(s) {', '.join(unknown)}; known: {', '.join(KNOWN_ARGS)}")
    eviction = {name: kwargs.get(name) for name in EVICTION_ARGS}
    eviction["policy_options"] = _policy_options(eviction["policy_options"])
    args = ModelArgs(
        pretrained=str(kwargs.get("pretrained") or DEFAULT_MODEL),
        config=None if kwargs.get("config") is None else str(kwargs["config"]),
        full_cache=_flag("full_cache", kwargs.get("full_cache", False)),
        eviction=eviction,
        video=VideoOptions(fps=_positive("fps", kwargs.get("fps", VideoOptions.fps), float),
                           max_frames=_max_frames(kwargs.get("max_frames", VideoOptions.max_frames))),
        device=None if kwargs.get("device") in (None, "") else str(kwargs["device"]),
        dtype=None if kwargs.get("dtype") in (None, "") else str(kwargs["dtype"]),
        batch_size=_positive("batch_size", kwargs.get("batch_size") or 1, int),
    )
    if args.full_cache and (eviction["budget"] is not None or eviction["memory_size"] is not None):
        raise ConfigError("full_cache=true keeps every entry: drop budget / memory_size, or drop full_cache")
    args.resolve()  # validates every eviction setting against the library default
    resolve_dtype(args.dtype, resolve_device(args.device))  # an unknown device or dtype fails here too
    return args


def _policy_options(value) -> dict | None:
    """`policy_options` as lmms-eval passes it: a JSON object string (`'{"window": 8}'`) or a dict."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"policy_options must be a JSON object such as '{{\"window\": 8}}', got {value!r} ({exc})") \
            from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"policy_options must be a JSON object such as '{{\"window\": 8}}', got {value!r}")
    return parsed


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _positive(name: str, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0 or (kind is int and isinstance(value, float) and value != number):
        raise ConfigError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return number


def _max_frames(value) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    return _positive("max_frames", value, int)
