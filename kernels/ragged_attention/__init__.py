"""Ragged attention over the slot pool (see `naive.py` for the contract)."""

from __future__ import annotations

from ..dispatch import backend_for
from . import naive


def ragged_attention(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale):
    """Attention of one layer's queries over their cached segments; Triton on CUDA, torch elsewhere."""
    args = (q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale)
    if backend_for(q) == "triton":
        from .triton_kernel import ragged_attention as impl
    else:
        impl = naive.ragged_attention
    return impl(*args)


__all__ = ["ragged_attention", "naive"]
