"""`DBTrimKVConfig`: how much KV memory a sequence may hold and which entries to keep.

Why: one small, validated object carries the eviction settings from YAML presets, the CLI, the
pipeline and checkpoints to the cache, and explains what is wrong when a setting cannot work
(e.g. a budget too small for the entries `min_per_head` protects).

Units: `budget` counts cache entries per sequence, summed over every layer and KV head (one
entry = one token's K and V in one head). `memory_size` M is the per-head view of the same
thing: `budget = L * H * M`. With neither set the cache keeps everything (useful as the
full-cache baseline inside the same engine). A preset or file may instead name `budget_scale`:
its budget relative to the model's default (0.25 = a quarter of it), so a preset such as
`budget-tight` is tight on every model; it is applied when the layers combine and is not stored.

`policy_options` are the chosen policy's own options (e.g. `{window: 32}` for snapkv); the policy
class validates them (`dbtrimkv.policies`). `threshold` is the threshold policy's tau, kept as a
setting of its own because it is the paper's knob (and the CLI's `--threshold`). Which layer of
defaults, presets and explicit options wins is decided in `dbtrimkv.settings.eviction_settings`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .limits import MAX_BUDGET, MAX_BUFFER_SIZE, MAX_LOOKAHEAD, MAX_MEMORY_SIZE, MAX_PREFILL_CHUNK
from ..policies import EvictionPolicy, get_policy, policy_names
from .presets import load_yaml, preset_names
from ..inputs.text_files import read_utf8

# Bounds on every setting: `limits.py`.
BUDGET_SCALE = "budget_scale"  # a preset's budget relative to the model's default (not a stored setting)
MAX_BUDGET_SCALE = 1024.0
LIBRARY_DEFAULT = "default"  # configs/default.yaml: the settings when neither the model nor the caller names any
_INT_BOUNDS = {"budget": (1, MAX_BUDGET), "memory_size": (1, MAX_MEMORY_SIZE), "buffer_size": (0, MAX_BUFFER_SIZE),
               "lookahead": (1, MAX_LOOKAHEAD), "min_per_head": (0, MAX_MEMORY_SIZE),
               "prefill_chunk": (1, MAX_PREFILL_CHUNK)}


@dataclass
class DBTrimKVConfig:
    budget: int | None = None
    memory_size: int | None = None
    buffer_size: int = 32
    policy: str = "global"
    threshold: float | None = None
    lookahead: int = 1
    min_per_head: int = 0
    prefill_chunk: int = 2048
    policy_options: dict[str, Any] = field(default_factory=dict)
    video_decay_scale: float = 1.0  # retention calibration (dbtrimkv/cache/calibration.py): video log beta x this
    decay_floor: float = 0.0  # ... and text / image log beta capped at -decay_floor

    def __post_init__(self) -> None:
        if self.budget is not None and self.memory_size is not None:
            raise ConfigError("set either budget (entries per sequence) or memory_size (entries per head), not both")
        for name, (low, high) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in ("budget", "memory_size"):
                continue
            if not _is_int(value) or not low <= value <= high:
                kind = "a positive integer" if low == 1 else "a non-negative integer"
                raise ConfigError(f"{name} must be {kind} (at most {high}), got {value!r}")
            setattr(self, name, int(value))  # numpy integers become plain ints
        if not isinstance(self.policy, str) or self.policy not in policy_names():
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(policy_names())}")
        if not isinstance(self.policy_options, Mapping):
            raise ConfigError(f"policy_options must be a mapping of option -> value, got {self.policy_options!r}")
        self.policy_options = dict(self.policy_options)
        if "threshold" in self.policy_options:
            raise ConfigError("set the threshold policy's tau with the `threshold` setting, not in policy_options")
        if self.threshold is not None:
            if not _is_real(self.threshold):
                raise ConfigError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
            self.threshold = float(self.threshold)
        if self.policy == "threshold":
            if self.threshold is None or not 0.0 < self.threshold <= 1.0:
                raise ConfigError(
                    f"the threshold policy needs threshold tau in (0, 1] (entries with beta^age >= tau stay), "
                    f"got {self.threshold!r}"
                )
        elif self.threshold is not None:
            raise ConfigError(f"threshold is only used by the threshold policy, not by {self.policy!r}")
        if not _is_real(self.video_decay_scale) or not 0.0 < self.video_decay_scale <= 1.0:
            raise ConfigError(f"video_decay_scale must be a number in (0, 1], got {self.video_decay_scale!r}")
        if not _is_real(self.decay_floor) or not 0.0 <= self.decay_floor <= 1.0:
            raise ConfigError(f"decay_floor must be a number in [0, 1], got {self.decay_floor!r}")
        self.video_decay_scale, self.decay_floor = float(self.video_decay_scale), float(self.decay_floor)
        self.build_policy()  # checks the policy name and its options now, not when a cache is built

    def build_policy(self) -> EvictionPolicy:
        """A new instance of the configured policy with its options (one per cache)."""
        options = dict(self.policy_options)
        if self.policy == "threshold":
            options["threshold"] = self.threshold
        return get_policy(self.policy, **options)

    # --- budget arithmetic -------------------------------------------------------------------
    @property
    def unbounded(self) -> bool:
        return self.budget is None and self.memory_size is None

    def resolve_budget(self, num_layers: int, num_kv_heads: int, policy: EvictionPolicy | None = None) -> int | None:
        """Entries kept per sequence for a model with L layers and H KV heads (None = no limit);
        `policy` (default: a new instance) checks that the budget can work for it."""
        if self.unbounded:
            return None
        budget = self.budget if self.budget is not None else self.memory_size * num_layers * num_kv_heads
        segments = num_layers * num_kv_heads
        if budget < segments * self.min_per_head:
            raise ConfigError(
                f"budget {budget} is too small for the protected tokens: min_per_head={self.min_per_head} over "
                f"{num_layers} layers x {num_kv_heads} KV heads needs at least {segments * self.min_per_head} entries"
            )
        (policy or self.build_policy()).check_budget(budget, num_layers, num_kv_heads)
        return budget

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DBTrimKVConfig":
        """Settings by name (missing ones: the field defaults); a relative `budget_scale` scales the
        library default's budget (`configs/default.yaml`), as no model is at hand here."""
        if not isinstance(data, dict):
            raise ConfigError(f"eviction settings must be a mapping, got {type(data).__name__}")
        data = data.get("eviction", data) if "eviction" in data else data  # a preset's `eviction:` section
        if not isinstance(data, dict):
            raise ConfigError(f"the eviction section must be a mapping of settings, got {_kind(data)}")
        data = dict(data)
        if any(not isinstance(key, str) for key in data):
            raise ConfigError(f"eviction setting names must be strings, got {sorted(map(repr, data))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {BUDGET_SCALE})
        if unknown:
            raise ConfigError(f"unknown eviction setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if BUDGET_SCALE in data:
            return cls(**apply_settings(cls.load(LIBRARY_DEFAULT).to_dict(), data))
        return cls(**data)

    @staticmethod
    def read_settings(name_or_path: str | Path) -> dict[str, Any]:
        """The raw mapping of a JSON file, a YAML file, or a preset name from `configs/`."""
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
            raise ConfigError(f"a config is a preset name or a YAML/JSON path, got {name_or_path!r}")
        path = Path(name_or_path)
        if path.suffix == ".json" and path.is_file():
            return _read_structured(path, json.loads)
        try:
            return load_yaml(name_or_path)
        except FileNotFoundError:
            raise ConfigError(f"no config file or preset named {str(name_or_path)!r}; eviction presets: "
                              f"{', '.join(preset_names('eviction'))}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def load(cls, name_or_path: str | Path) -> "DBTrimKVConfig":
        """Read a JSON file, a YAML file, or a preset name from `configs/` (unnamed settings: defaults)."""
        return cls.from_dict(cls.read_settings(name_or_path))

    def save(self, path: str | Path) -> None:
        """Write JSON (`.json`) or YAML (anything else)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes) -> "DBTrimKVConfig":
        """This config with `changes` applied by the layering rule (`apply_settings`)."""
        return DBTrimKVConfig(**apply_settings(self.to_dict(), changes))


def apply_settings(settings: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` with one layer of named settings applied (the rule of `dbtrimkv.settings.eviction_settings`):
    setting `budget` clears `memory_size` and vice versa; `budget_scale` multiplies the budget (or
    memory size) the settings already have; choosing another policy drops the previous policy's
    `threshold` and `policy_options` unless the layer sets them; `policy_options` are merged."""
    out = dict(settings)
    if layer.get(BUDGET_SCALE) is not None:
        out = _scaled(out, layer)
        layer = {k: v for k, v in layer.items() if k != BUDGET_SCALE}
    if layer.get("budget") is not None and "memory_size" not in layer:
        out["memory_size"] = None
    if layer.get("memory_size") is not None and "budget" not in layer:
        out["budget"] = None
    if "policy" in layer and layer["policy"] != out.get("policy"):
        out["threshold"], out["policy_options"] = None, {}
    for key, value in layer.items():
        if key == "policy_options":
            if not isinstance(value, Mapping):
                raise ConfigError(f"policy_options must be a mapping of option -> value, got {value!r}")
            out[key] = {**(out.get(key) or {}), **value}
        else:
            out[key] = value
    return out


def _scaled(settings: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` with its budget (or memory size) times the layer's `budget_scale` (at least 1 entry)."""
    scale = layer[BUDGET_SCALE]
    if not _is_real(scale) or not 0 < scale <= MAX_BUDGET_SCALE:
        raise ConfigError(f"{BUDGET_SCALE} must be a number in (0, {MAX_BUDGET_SCALE}], got {scale!r}")
    if layer.get("budget") is not None or layer.get("memory_size") is not None:
        raise ConfigError(f"set either {BUDGET_SCALE} (relative to the model's default) or budget / memory_size, "
                          "not both")
    name = "memory_size" if settings.get("memory_size") is not None else "budget"
    if settings.get(name) is None:
        raise ConfigError(f"{BUDGET_SCALE} scales the model's default budget, but it has none (a full cache): "
                          "set budget or memory_size instead")
    high = MAX_MEMORY_SIZE if name == "memory_size" else MAX_BUDGET
    return dict(settings, **{name: min(high, max(1, round(settings[name] * scale)))})


def _kind(value) -> str:
    return "nothing (null)" if value is None else type(value).__name__


def _read_structured(path: Path, parse) -> Any:
    """Parse a JSON/YAML file's text with a ConfigError for unreadable, non-UTF-8 or malformed files."""
    text = read_utf8(path, ConfigError)
    if not text.strip():
        raise ConfigError(f"{path} is empty")
    try:
        return parse(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: malformed JSON ({exc})") from None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
