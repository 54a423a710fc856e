"""What an engine of its own is built from, as plain values that travel to another process.

Why: a Ray Serve replica (`ray_app.py`) and the engine process of `dbtrimkv serve --engine-process`
(`engine_process.py`) each load the model and build the server's engine where they run, from the
same recipe; the eviction settings are resolved there, against that process's own copy of the
model, as `dbtrimkv serve` resolves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..loading import checkpoints
from ..settings.config import DBTrimKVConfig
from ..settings.eviction_settings import resolve_eviction
from .server import ServerOptions


@dataclass
class ReplicaSpec:
    model: str | None
    device: str | None
    dtype: str | None
    eviction: dict  # `resolve_eviction` keyword arguments (commands.common.eviction_request)
    options: ServerOptions
    loader: Callable[[], tuple] | None = None  # picklable; gives (model, processor) instead of loading `model`

    def load(self) -> tuple:
        """(model, processor, the resolved DBTrimKVConfig)."""
        if self.loader is not None:
            model, processor = self.loader()
        else:
            model, processor = checkpoints.load_model(self.model, device=self.device, dtype=self.dtype)
        config: DBTrimKVConfig = resolve_eviction(model, **self.eviction)
        return model, processor, config
