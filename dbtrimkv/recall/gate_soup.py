"""Average two sets of gate weights of the same model ("weight-space soup"): `(1 - alpha) * start + alpha * end`.

Why: the gate stages of tiny-recall trade against each other. Stage 2 keeps card streams at small
budgets (69 / 89 / 94% at 2 / 5 / 10% of the cache), stage 3 (stage 2 continued) buys hour-long
video (M = 512, 60 minutes: 81 -> 94%) and loses card streams at 2% (62%). Stage 3 continues stage
2, so the two lie in one basin, and a point between them keeps most of both: the shipped gates are
this soup of the two at alpha 0.4 (README, long-video section). The arithmetic is elementwise in
float32, so the soup of the documented stages' files reproduces the shipped file bit for bit, and
weights tied across layers stay tied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read gate weights {path}: {exc}") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} is not finite floating point ({tensor.dtype})")
    return state


def soup_gates(start: str | Path, end: str | Path, alpha: float, output: str | Path) -> Path:
    """Write `(1 - alpha) * start + alpha * end` (gate safetensors files of one model) to `output`;
    `alpha` in [0, 1] (0: `start`'s values, 1: `end`'s). `output` may be one of the inputs."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    a, b = _read(Path(start)), _read(Path(end))
    if a.keys() != b.keys():
        differ = sorted(a.keys() ^ b.keys())
        raise CheckpointError(f"{start} and {end} hold different gate tensors: {', '.join(differ[:5])}")
    for name in a:
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            raise CheckpointError(f"{name}: {tuple(a[name].shape)} {a[name].dtype} in {start}, "
                                  f"{tuple(b[name].shape)} {b[name].dtype} in {end}")
    soup = {name: ((1.0 - alpha) * a[name] + alpha * b[name]).contiguous() for name in a}
    save_file(soup, str(output))
    return Path(output)
