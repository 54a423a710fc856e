"""dbtrimkv: Qwen3-VL inference inside a fixed KV-cache budget.

Learned retention gates score every cached token, a shared calibration projection makes the
scores comparable across layers and heads, and one global top-k evicts text, image and video
entries from all layers and heads under a single budget.

`import dbtrimkv` is light (no torch, no transformers): the public names below load their module
on first use, so `dbtrimkv --help` answers at once. `_import_hooks` still makes the CUDA-built
torchvision importable on a CPU torch (just before torchvision is first imported) and registers the
`transformers.pipeline("dbtrimkv-image-text-to-text")` task once transformers' pipelines load.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import _import_hooks
from ._hub_kernels_compat import ensure_hub_kernels_importable

# Must run before anything imports transformers' modeling code (it imports the Hub's `kernels`); standard library only.
ensure_hub_kernels_importable()

__version__ = "0.1.0"

# public name -> the module that owns it (imported on first access)
_PUBLIC = {
    "DBTrimKVConfig": "settings.config", "attach_retention_gates": "modeling.gates", "DBTrimKVCache": "cache",
    "export_released_format": "loading.checkpoints", "load_model": "loading.checkpoints", "save_gates": "loading.checkpoints",
    "generate": "generation", "prefill": "generation", "Conversation": "pipeline", "DBTrimKVPipeline": "pipeline",
}

_import_hooks.install()


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a subpackage on first use (PEP 562), so `dbtrimkv.cache.save_cache(...)` works after `import dbtrimkv`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    "Conversation", "DBTrimKVCache", "DBTrimKVConfig", "DBTrimKVPipeline", "attach_retention_gates", "export_released_format", "generate",
    "load_model", "prefill", "save_gates", "__version__",
]
