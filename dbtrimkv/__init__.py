"""dbtrimkv: Qwen3-VL inference inside a fixed KV-cache budget.

Learned retention gates score every cached token, a shared calibration projection makes the
scores comparable across layers and heads, and one global top-k evicts text, image and video
entries from all layers and heads under a single budget.
"""

from ._torchvision_compat import ensure_torchvision_importable

# Must run before anything imports torchvision (transformers' image utilities do).
ensure_torchvision_importable()

__version__ = "0.1.0"
