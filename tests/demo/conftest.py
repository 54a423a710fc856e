"""Fixtures for the demo tests: the demo module and one served demo on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_testing import MAX_UPLOAD_MB, MAX_VIDEO_SECONDS, QUEUE_SIZE, SERVED_BUDGET, free_port

from dbtrimkv.commands.demo import load_demo_module
from dbtrimkv.pipeline import DBTrimKVPipeline


@pytest.fixture(scope="session")
def write_mp4(pytestconfig):
    """tests/conftest.py's mp4 writer (every conftest module is named `conftest`, so it cannot be imported)."""
    return pytestconfig.pluginmanager.get_plugin(str(Path(__file__).parents[1] / "conftest.py")).write_mp4


@pytest.fixture(scope="session")
def demo_module():
    return load_demo_module()


@pytest.fixture(scope="session")
def demo_pipeline():
    return DBTrimKVPipeline.from_pretrained("tiny", budget=SERVED_BUDGET)


@pytest.fixture(scope="session")
def served_demo(demo_module, demo_pipeline):
    """(Blocks, local URL) of the demo running in this process with `launch`'s defaults."""
    demo = demo_module.build_demo(demo_pipeline, max_video_seconds=MAX_VIDEO_SECONDS, max_new_tokens=16)
    _, url, _ = demo_module.launch(demo, port=free_port(), max_upload_mb=MAX_UPLOAD_MB, queue_size=QUEUE_SIZE,
                                   prevent_thread_lock=True)
    yield demo, url
    demo.close()
