"""Torch reference of ragged attention over the slot pool: the contract of the Triton kernels.

Queries of one layer, `q[B, Hq, C, D]` at logical positions `q_pos[B, C]` (-1 marks a padding
query, whose output is zero), attend to the cached entries of their KV head's segment
(`s = (b * L + layer) * H + h`, GQA: query head j uses KV head j // (Hq // H)). The rule: a query
at position p sees every cached entry of its segment with position i <= p. Softmax in float32,
output in the dtype of `q`.

The segment rows are gathered through the slot tables into a padded dense tensor, then
`scaled_dot_product_attention` runs with the position mask. (The engine's CPU path does not gather
per step: it attends over contiguous per-layer views, `dbtrimkv/cache/view_attention.py`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_slots(table, seg_start, seg_len, segs):
    """Slot ids of the given segments, padded to the longest: `[*segs.shape, Lmax]` int64 (0 where
    not valid) and the validity mask."""
    lens = seg_len.to(torch.int64)[segs]
    lmax = int(lens.max()) if lens.numel() else 0
    j = torch.arange(lmax, device=table.device)
    valid = j < lens[..., None]
    tidx = seg_start.to(torch.int64)[segs][..., None] + j
    slots = torch.where(valid, table[tidx.clamp(max=max(table.numel() - 1, 0))].to(torch.int64), 0)
    return slots, valid


def gather_rows(pool, slots):
    """`pool[slots]` via index_select on the flat slot ids (same rows, ~1.6x faster on CPU)."""
    return pool.index_select(0, slots.flatten()).view(*slots.shape, *pool.shape[1:])


def gather_segments(k_pool, v_pool, pos_pool, table, seg_start, seg_len, segs):
    """Dense copies of the given segments: K, V `[*segs.shape, Lmax, D]`, positions (-1 = none)."""
    slots, valid = segment_slots(table, seg_start, seg_len, segs)
    key_pos = torch.where(valid, pos_pool[slots].to(torch.int64), -1)
    return gather_rows(k_pool, slots), gather_rows(v_pool, slots), key_pos, valid


def layer_segments(batch: int, layer: int, num_layers: int, num_kv_heads: int, device) -> torch.Tensor:
    """Segment ids `[B, H]` of one layer."""
    b = torch.arange(batch, device=device)[:, None]
    h = torch.arange(num_kv_heads, device=device)[None, :]
    return (b * num_layers + layer) * num_kv_heads + h


def ragged_attention(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale):
    """Attention output `[B, Hq, C, D]` (see the module docstring for the rule)."""
    batch, num_q_heads, _, _ = q.shape
    num_kv_heads = seg_len.numel() // (batch * num_layers)
    segs = layer_segments(batch, layer, num_layers, num_kv_heads, q.device)
    keys, values, key_pos, valid = gather_segments(k_pool, v_pool, pos_pool, table, seg_start, seg_len, segs)
    q_pos = q_pos.to(torch.int64)
    visible = valid[:, :, None, :] & (key_pos[:, :, None, :] <= q_pos[:, None, :, None])  # [B, H, C, L]
    visible = visible.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
    has_any = visible.any(-1, keepdim=True)
    mask = visible | ~has_any  # rows that see nothing get a harmless full row, zeroed below
    out = F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return torch.where(has_any, out, torch.zeros((), dtype=out.dtype, device=out.device))
