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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
        for name in ("budget", "memory_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.buffer_size) or self.buffer_size < 0:
            raise ConfigError(f"buffer_size must be a non-negative integer, got {self.buffer_size!r}")
        if not _is_int(self.lookahead) or self.lookahead < 1:
            raise ConfigError(f"lookahead must be an integer >= 1, got {self.lookahead!r}")
        if not _is_int(self.min_per_head) or self.min_per_head < 0:
            raise ConfigError(f"min_per_head must be a non-negative integer, got {self.min_per_head!r}")
        if not _is_int(self.prefill_chunk) or self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        if self.policy not in policy_names():
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(policy_names())}")
        if self.policy == "threshold":
            if self.threshold is None or not 0.0 < float(self.threshold) <= 1.0:
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
        data = dict(data.get("eviction", data))  # accept a preset with an `eviction:` section
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown eviction setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "DBTrimKVConfig":
        """Read a JSON file, a YAML file, or a preset name from `configs/`."""
        path = Path(name_or_path)
        if path.suffix == ".json" and path.is_file():
            return cls.from_dict(json.loads(path.read_text()))
        from .presets import load_yaml

        try:
            return cls.from_dict(load_yaml(name_or_path))
        except FileNotFoundError as exc:
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
