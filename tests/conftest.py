"""Shared fixtures: tiny offline models, generated images and videos.

Everything is built from configs on the fly (no downloads); models are built once per session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import dbtrimkv  # noqa: E402,F401  (declares torchvision's op schemas on CPU torch)
from dbtrimkv.loading.tiny import build_tiny  # noqa: E402
from helpers import random_image  # noqa: E402

torch.set_num_threads(2)

ONE_THREAD_FOLDERS = ("eval", "recall", "video_qa")  # many small forwards: one torch thread is faster on 2 busy cores


@pytest.fixture(autouse=True)
def one_torch_thread_in_small_model_folders(request):
    """One torch thread for the tests under ONE_THREAD_FOLDERS, restored afterwards."""
    if request.node.path.parent.name not in ONE_THREAD_FOLDERS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_mp4(path, num_frames: int = 16, fps: int = 8, height: int = 48, width: int = 64, seed: int = 0):
    """Write a small random mp4 (mpeg4 codec) with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def tiny_vl():
    return build_tiny("qwen3_vl")


@pytest.fixture(scope="session")
def tiny_moe():
    return build_tiny("qwen3_vl_moe")


@pytest.fixture(scope="session")
def tiny_text():
    return build_tiny("qwen3")


@pytest.fixture(scope="session")
def image_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "image.png"
    random_image(1).save(path)
    return path


@pytest.fixture(scope="session")
def video_mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("media") / "clip.mp4")
