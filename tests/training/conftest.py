"""Fixtures for the gate-training tests.

The tests run single-threaded: the tiny models are far too small to gain from threads, and on a
shared 2-core machine two threads per process make every matmul wait on the other jobs.
"""

from __future__ import annotations

import pytest
import torch

from dbtrimkv.training.synthetic import write_synthetic_dataset


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_chats(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("chats"), num_examples=12, seed=3)


@pytest.fixture(scope="session")
def text_chats(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("text-chats"), num_examples=12, seed=4, images=False)
