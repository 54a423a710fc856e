"""dbtrimkv: Qwen3-VL inference inside a fixed KV-cache budget.

Learned retention gates score every cached token, a shared calibration projection makes the
scores comparable across layers and heads, and one global top-k evicts text, image and video
entries from all layers and heads under a single budget.
"""

from ._hub_kernels_compat import ensure_hub_kernels_importable
from ._torchvision_compat import ensure_torchvision_importable

# Must run before anything imports transformers' modeling code (it imports the Hub's `kernels`).
ensure_hub_kernels_importable()
# Must run before anything imports torchvision (transformers' image utilities do).
ensure_torchvision_importable()

__version__ = "0.1.0"

from .config import DBTrimKVConfig  # noqa: E402
from .gates import attach_retention_gates  # noqa: E402
from .cache import DBTrimKVCache  # noqa: E402
from .checkpoints import export_released_format, load_model, save_gates  # noqa: E402
from .generation import generate, prefill  # noqa: E402
from .pipeline import Conversation, DBTrimKVPipeline  # noqa: E402
from .hf_pipeline import register as _register_pipeline_task  # noqa: E402

_register_pipeline_task()

__all__ = [
    "Conversation", "DBTrimKVCache", "DBTrimKVConfig", "DBTrimKVPipeline", "attach_retention_gates", "export_released_format", "generate",
    "load_model", "prefill", "save_gates", "__version__",
]
