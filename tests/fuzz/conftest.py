"""Fixtures for the fuzz suite: one tiny-recall pipeline per session, peak-RSS measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def recall_pipe():
    """The shipped tiny-recall pipeline (loaded once; every fuzz module shares it)."""
    from dbtrimkv import DBTrimKVPipeline

    return DBTrimKVPipeline.from_pretrained()


class PeakRSS:
    """Peak resident memory growth of this process while the block runs (Linux: resets VmHWM)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth_mb = (_status("VmHWM") - self.start) / 1024
        return False


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture
def peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status("VmHWM")
    except (OSError, KeyError):
        pytest.skip("peak RSS needs Linux /proc/self/clear_refs")
    return PeakRSS
