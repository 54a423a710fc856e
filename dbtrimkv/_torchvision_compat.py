"""Let the PyPI (CUDA-built) torchvision import on a CPU-only torch.

Why: transformers builds the Qwen3-VL image/video processors on torchvision, and PyPI ships
only CUDA builds of torchvision for Linux. On a CPU torch its compiled ops library
(`torchvision/_C.so`) fails to load, and `import torchvision` then crashes because
`torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms` and
`torchvision::qnms`, whose schemas only that library would have defined.

What: before torchvision is imported, and only if its ops library cannot be loaded, declare
those two schemas (no kernels). Everything the processors use (tensor transforms) then works;
calling `torchvision.ops.nms` still fails loudly, as it would have anyway. On a machine with a
working torchvision, or with none, this does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Schemas that torchvision registers fake (meta) kernels for unconditionally at import time.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the declared schemas alive for the life of the process


def _ops_library_loads(package_dir: Path) -> bool:
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's op schemas if its compiled ops cannot load. Returns True if it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _ops_library_loads(Path(list(spec.submodule_search_locations)[0])):
        return False

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _schema_exists(name):
            lib.define(schema)
    _library = lib
    logger.info(
        "dbtrimkv: torchvision's compiled ops do not load on this torch (%s); declared the "
        "nms/qnms schemas so the image and video processors can import (detection ops stay "
        "unavailable).",
        torch.__version__,
    )
    return True


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False
