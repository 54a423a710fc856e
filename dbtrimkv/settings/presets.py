"""Find and read the YAML presets shipped in `configs/` (installed as `dbtrimkv.configs`).

Why: the tiny model sizes, eviction budgets and training recipes are data, kept as YAML files a
user can read and copy. A preset can be named by file name (`tiny-qwen3-vl.yaml`, or without
the suffix) or given as a path to any YAML file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..inputs.text_files import read_utf8


def preset_names(section: str | None = None) -> list[str]:
    """Names of the shipped presets (file names without `.yaml`); with `section`, only those that have
    that top-level section (e.g. `eviction`: the presets `--config` takes, not the training recipes)."""
    files = sorted((p for p in resources.files("dbtrimkv.configs").iterdir() if p.name.endswith(".yaml")),
                   key=lambda p: p.name)
    return [p.name[:-5] for p in files if section is None or _has_section(p.read_text(encoding="utf-8"), section)]


def _has_section(text: str, section: str) -> bool:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and isinstance(data.get(section), dict)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name or a YAML path to an existing file, with a clear error otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name if path.name.endswith((".yaml", ".yml")) else f"{path.name}.yaml"
    candidate = resources.files("dbtrimkv.configs").joinpath(name)
    if candidate.is_file():
        return Path(str(candidate))
    raise FileNotFoundError(
        f"no config file or preset named {str(name_or_path)!r}; shipped presets: {', '.join(preset_names())}"
    )


def load_yaml(name_or_path: str | Path) -> dict[str, Any]:
    """Parse a preset or YAML file into a dict (safe loader: plain data only)."""
    path = preset_path(name_or_path)
    text = read_utf8(path, ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({' '.join(str(exc).split())})") from None
    except RecursionError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if data is None:
        raise ConfigError(f"{path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data
