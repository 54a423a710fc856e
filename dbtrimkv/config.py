"""`DBTrimKVConfig`: how much KV memory a sequence may hold and which entries to keep.

Why: one small, validated object carries the eviction settings from YAML presets, the CLI, the
pipeline and checkpoints to the cache, and explains what is wrong when a setting cannot work
(e.g. a budget too small for the entries `min_per_head` protects).

Units: `budget` counts cache entries per sequence, summed over every layer and KV head (one
entry = one token's K and V in one head). `memory_size` M is the per-head view of the same
thing: `budget = L * H * M`. With neither set the cache keeps everything (useful as the
full-cache baseline inside the same engine).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# Bounds on every setting, so no file or flag can ask for an absurd reservation (the pool holds up to
# budget + layers x KV heads x max(buffer_size, prefill chunk) entries per sequence).
MAX_BUDGET = 2**31 - 1  # slot ids are int32
MAX_MEMORY_SIZE = 2**24
MAX_BUFFER_SIZE = 8192
MAX_PREFILL_CHUNK = 2**20
MAX_LOOKAHEAD = 2**20
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

    def __post_init__(self) -> None:
        from .policies import policy_names

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

    # --- budget arithmetic -------------------------------------------------------------------
    @property
    def unbounded(self) -> bool:
        return self.budget is None and self.memory_size is None

    def resolve_budget(self, num_layers: int, num_kv_heads: int) -> int | None:
        """Entries kept per sequence for a model with L layers and H KV heads (None = no limit)."""
        if self.unbounded:
            return None
        budget = self.budget if self.budget is not None else self.memory_size * num_layers * num_kv_heads
        segments = num_layers * num_kv_heads
        if budget < segments * self.min_per_head:
            raise ConfigError(
                f"budget {budget} is too small for the protected tokens: min_per_head={self.min_per_head} over "
                f"{num_layers} layers x {num_kv_heads} KV heads needs at least {segments * self.min_per_head} entries"
            )
        from .policies import get_policy

        get_policy(self.policy).check_budget(budget, num_layers, num_kv_heads)
        return budget

    @property
    def min_log_score(self) -> float | None:
        """log(tau) for the threshold policy."""
        return math.log(float(self.threshold)) if self.threshold is not None else None

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DBTrimKVConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"eviction settings must be a mapping, got {type(data).__name__}")
        data = data.get("eviction", data) if "eviction" in data else data  # a preset's `eviction:` section
        if not isinstance(data, dict):
            raise ConfigError(f"the eviction section must be a mapping of settings, got {_kind(data)}")
        data = dict(data)
        if any(not isinstance(key, str) for key in data):
            raise ConfigError(f"eviction setting names must be strings, got {sorted(map(repr, data))}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown eviction setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "DBTrimKVConfig":
        """Read a JSON file, a YAML file, or a preset name from `configs/`."""
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
            raise ConfigError(f"a config is a preset name or a YAML/JSON path, got {name_or_path!r}")
        path = Path(name_or_path)
        if path.suffix == ".json" and path.is_file():
            return cls.from_dict(_read_structured(path, json.loads))
        from .presets import load_yaml

        try:
            return cls.from_dict(load_yaml(name_or_path))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise ConfigError(str(exc)) from None

    def save(self, path: str | Path) -> None:
        """Write JSON (`.json`) or YAML (anything else)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes) -> "DBTrimKVConfig":
        data = self.to_dict()
        if "budget" in changes and changes["budget"] is not None:
            data["memory_size"] = None
        if "memory_size" in changes and changes["memory_size"] is not None:
            data["budget"] = None
        data.update(changes)
        return DBTrimKVConfig(**data)


def _kind(value) -> str:
    return "nothing (null)" if value is None else type(value).__name__


def _read_structured(path: Path, parse) -> Any:
    """Parse a JSON/YAML file's text with a ConfigError for unreadable, non-UTF-8 or malformed files."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
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
