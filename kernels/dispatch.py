"""Choose between the Triton kernels and their torch references.

CUDA tensors go to Triton, everything else to the reference. The environment variable
`DBTRIMKV_KERNELS` forces a backend: `torch` (reference everywhere, e.g. to debug on GPU) or
`triton` (Triton everywhere; on CPU tensors this needs `TRITON_INTERPRET=1`, which is how the
tests check kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton")


def backend_for(tensor: torch.Tensor) -> str:
    forced = os.environ.get("DBTRIMKV_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DBTRIMKV_KERNELS={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    return "triton" if tensor.is_cuda else "torch"
