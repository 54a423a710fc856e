"""One torch thread for the eval tests: their many small forwards run faster without thread handoffs,
especially on a shared machine. Restored afterwards for the other test folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
