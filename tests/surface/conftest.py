"""Fixtures for the user-surface tests (issue 27): the fuzz suite's in-process CLI runner, and no model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "fuzz"))  # cli_harness: run `dbtrimkv.cli.main` in-process


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model loads or an evaluation / training starts (errors must come first)."""
    import dbtrimkv.loading.checkpoints
    import dbtrimkv.eval.harness
    import dbtrimkv.eval.long_video
    import dbtrimkv.recall.train_model
    import dbtrimkv.training

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(dbtrimkv.loading.checkpoints, "load_model", refuse)
    monkeypatch.setattr(dbtrimkv.eval.harness, "run_benchmark", refuse)
    monkeypatch.setattr(dbtrimkv.eval.long_video, "run_long_video", refuse)
    monkeypatch.setattr(dbtrimkv.recall.train_model, "train", refuse)
    monkeypatch.setattr(dbtrimkv.training, "train", refuse)
