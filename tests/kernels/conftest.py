"""Kernel tests: run the Triton kernels against their torch references, on CPU via the interpreter.

Triton decides at decoration time whether a `@triton.jit` function is interpreted, so
`TRITON_INTERPRET=1` must be set before the kernel modules are imported; this conftest sets it when
pytest collects this folder, before any test runs (the kernel modules are imported lazily by the
dispatchers). The kernels use no `@jit` helper of triton.language (`tl.sum`, `tl.cumsum`, ...),
which would only be interpreted if triton itself had been imported after the variable was set:
other test folders import transformers, which imports triton, before this one is collected.
On a CUDA machine the real kernels run instead.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_usable() -> str | None:
    """Why the Triton kernels cannot run in this process, or None when they can."""
    if DEVICE.type == "cuda":
        return None
    from triton.runtime.interpreter import InterpretedFunction

    from dbtrimkv.kernels.ragged_attention import triton_kernel as attention_kernels
    from dbtrimkv.kernels.select_compact import triton_kernel as select_kernels

    if not all(isinstance(kernel, InterpretedFunction)
               for kernel in (select_kernels._compact, attention_kernels._decode_partial)):
        return "the kernel modules were imported before TRITON_INTERPRET=1 was set"
    return None


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton implementations through the public dispatchers."""
    reason = _triton_usable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DBTRIMKV_KERNELS", "triton")


@pytest.fixture
def device():
    return DEVICE
