"""Real-scale tests: real model shapes (`configs/shapes/`), bf16 / fp16, released checkpoint layouts,
real media sizes. They reuse the engine tests' dense masked reference (`tests/engine/masked_reference.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

ENGINE_TESTS = str(Path(__file__).resolve().parents[1] / "engine")
if ENGINE_TESTS not in sys.path:
    sys.path.insert(0, ENGINE_TESTS)
