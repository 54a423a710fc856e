"""Fixtures for the long-video QA tests: a tiny gated model and small generated mp4 clips.

The tests run the model on one thread (tests/conftest.py): the CI machine's two cores are shared,
and two torch threads fighting over a busy core make the tiny model's many small matmuls ~50x slower.
"""

from __future__ import annotations

import pytest
from helpers import randomize_gates, write_clip

import dbtrimkv
from dbtrimkv.loading.tiny import build_tiny


@pytest.fixture(scope="module")
def gated():
    """(model, processor): the tiny Qwen3-VL with retention gates that give varied scores."""
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    randomize_gates(model)
    return model, processor


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Write-once clips by frame count: `clips(16)` is a 2 s clip at 8 fps."""
    folder = tmp_path_factory.mktemp("clips")

    def clip(frames: int, seed: int = 0):
        path = folder / f"clip{frames}-{seed}.mp4"
        return path if path.exists() else write_clip(path, frames, seed=seed)

    return clip
