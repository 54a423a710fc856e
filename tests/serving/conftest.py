"""Fixtures of the server tests (helpers live in serving_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def recall_pipeline():
    from dbtrimkv import DBTrimKVPipeline

    return DBTrimKVPipeline.from_pretrained()
