"""Where a cache's eviction settings come from: one rule for every entry point.

Why: the pipeline, the CLI, the demo, video QA, the evaluation and the training export all turn
"the model, maybe a preset or file, maybe some explicit options" into one `DBTrimKVConfig`. Written
once here, they cannot disagree (before, a checkpoint saved without settings reloaded unbounded
in one place and with the default preset in another, and an explicit keyword default silently
replaced the policy of a given config).

The rule, applied layer by layer:
1. the model's saved default: the settings its checkpoint was saved with; for a model without
   any, the library default (`configs/default.yaml`); with no model, the library default;
2. a preset name or YAML/JSON file: only the settings it names (a `DBTrimKVConfig` object instead
   names every setting, so it replaces layer 1 entirely); its `budget_scale` multiplies layer 1's
   budget, so `budget-tight` (0.25) is a quarter of whatever the model's default is;
3. explicit arguments: only those the caller set (None means "not set"); `full_cache=True`
   removes both limits.
Within a layer: setting `budget` clears `memory_size` and vice versa; choosing another policy
drops the previous policy's `threshold` and `policy_options` unless the same layer sets them;
`policy_options` named by a layer are merged into the current ones. The result is validated once,
at the end (so a file may choose `policy: threshold` and the command line give `--threshold`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import BUDGET_SCALE, LIBRARY_DEFAULT, DBTrimKVConfig, apply_settings
from ..errors import ConfigError
from ..modeling.model_state import saved_eviction

SETTINGS = tuple(f.name for f in fields(DBTrimKVConfig))
LAYER_SETTINGS = SETTINGS + (BUDGET_SCALE,)  # what a preset, a file or a mapping may name


def library_default() -> DBTrimKVConfig:
    """The settings used when neither the model nor the caller names any (`configs/default.yaml`)."""
    return DBTrimKVConfig.load(LIBRARY_DEFAULT)


def default_eviction_config(model) -> DBTrimKVConfig:
    """The model's saved default: what its checkpoint was saved with, else the library default."""
    saved = saved_eviction(model)
    return saved if saved is not None else library_default()


def named_settings(source: str | Path | Mapping) -> dict[str, Any]:
    """The settings a preset name, a YAML/JSON file or a mapping names (an `eviction:` section is
    accepted), without filling in the ones it leaves out."""
    data = DBTrimKVConfig.read_settings(source) if isinstance(source, (str, Path)) else source
    if not isinstance(data, Mapping):
        raise ConfigError(f"eviction settings must be a mapping, a file or a preset name, got {type(source).__name__}")
    section = data.get("eviction", data)
    if not isinstance(section, Mapping):
        kind = "nothing (null)" if section is None else type(section).__name__
        raise ConfigError(f"the eviction section must be a mapping of settings, got {kind}")
    if any(not isinstance(key, str) for key in section):
        raise ConfigError(f"eviction setting names must be strings, got {sorted(map(repr, section))}")
    data = dict(section)
    unknown = sorted(set(data) - set(LAYER_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown eviction setting(s): {', '.join(unknown)}; known: {', '.join(sorted(SETTINGS))}")
    return data


def resolve_eviction(model=None, config: DBTrimKVConfig | str | Path | Mapping | None = None, *,
                     full_cache: bool = False, **explicit) -> DBTrimKVConfig:
    """The eviction settings for `model` by the rule of the module docstring.

    `config`: a `DBTrimKVConfig` (replaces the model's default), a preset name, a YAML/JSON path or a
    mapping (applied on top of it). `explicit`: settings by name (`budget=`, `policy=`,
    `policy_options=`, ...); None values are "not set".
    """
    unknown = sorted(set(explicit) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown eviction setting(s): {', '.join(unknown)}; known: {', '.join(sorted(SETTINGS))}")
    if isinstance(config, DBTrimKVConfig):
        settings = config.to_dict()
    else:
        base = default_eviction_config(model) if model is not None else library_default()
        settings = base.to_dict()
        if config is not None:
            settings = apply_settings(settings, named_settings(config))
    settings = apply_settings(settings, {k: v for k, v in explicit.items() if v is not None})
    if full_cache:
        settings.update(budget=None, memory_size=None)
    return DBTrimKVConfig(**settings)
