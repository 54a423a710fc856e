"""The attention each cached entry of one layer received (`policies.view.LayerAttention`), for the
policies that rank by it (SnapKV, H2O).

Why: those policies need attention probabilities, which the attention kernels never hand out. A
policy says which queries it counts (`EvictionPolicy.observed_queries`, once per forward); the
cache then gives it, per layer, the probability mass each cached entry received from them, summed
over the query heads of its KV head, in the segment's table order (position order) padded to the
layer's longest segment, with the entries' slots (and the slots this forward filled). Two
producers, same values:

- `from_views` (CPU): lays out the mass that the attention over the contiguous K/V views computed
  (`view_attention`: in decode the softmax of the attention itself, in prefill the counted queries'
  softmax over the same view and new keys): no keys gathered from the pool; a decode step hands
  every layer's at once, after the last layer (`from_decode_views`);
- `from_pool` (the plain reference, and the path when the kernels read the slot pool, i.e. CUDA):
  gathers the layer's keys through the slot tables and recomputes the softmax.
"""

from __future__ import annotations

import torch

from ..policies.view import LayerAttention
from .forward_plan import ForwardContext


QUERY_BLOCK = 256  # queries per block in `from_pool` (bounds its logits to block x entries)


def from_pool(store, forward: ForwardContext, layer_idx: int, query: torch.Tensor, scale: float) -> LayerAttention:
    """The reference: the layer's entries read through the slot tables of the `store`, their keys
    gathered from the pool, and the softmax of the counted queries (`forward.counted`, `[B, T]` bool)
    recomputed in float32 blocks."""
    segs = store.tables.layer_segments(layer_idx, store.num_layers, store.num_kv_heads)
    slots, valid = store.tables.padded_slots(segs)
    key_pos = torch.where(valid, store.pool.pos[slots].to(torch.int64), -1)
    query_pos, counted = forward.plan.query_positions, forward.counted
    picked = counted.any(0)
    query, query_pos, counted = query[:, :, picked], query_pos[:, picked], counted[:, picked]
    batch, num_q = query.shape[:2]
    group = num_q // store.num_kv_heads
    keys = store.pool.k.index_select(0, slots.flatten()).view(*slots.shape, -1).to(torch.float32)  # [B, H, L, D]
    keys = keys.repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    mass = torch.zeros(batch, num_q, keys.shape[2], dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[2], QUERY_BLOCK):
        q = query[:, :, start : start + QUERY_BLOCK].to(torch.float32)
        qp = query_pos[:, start : start + QUERY_BLOCK].to(torch.int64)
        logits = torch.einsum("bhtd,bhld->bhtl", q, keys) * scale
        visible = valid[:, :, None, :] & (key_pos[:, :, None, :] <= qp[:, None, :, None])  # [B, H, t, L]
        visible = visible.repeat_interleave(group, dim=1)
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        mass += (probs * counted[:, None, start : start + QUERY_BLOCK, None]).sum(2)
    return LayerAttention(slots, valid, mass.view(batch, store.num_kv_heads, group, -1).sum(2),
                          _new_slots(store, forward, layer_idx))


def from_views(store, forward: ForwardContext, view_length: torch.Tensor, layer_idx: int, mass_view: torch.Tensor, mass_new: torch.Tensor | None = None,
               new_valid: torch.Tensor | None = None) -> LayerAttention:
    """The CPU path: the mass the attention over the views computed (`view_attention.attention_mass`,
    `attend_view_with_mass`) over the layer's view rows `[B, H, C]` (the entries cached before this
    forward, or all of them when decoding) and over this forward's new columns `mass_new` `[B, H, T]`
    (prefill; None when decoding; `new_valid` `[B, T]` marks the real columns, None = all), laid out
    like the slot tables (a segment's view rows are its first entries, this forward's real tokens the
    rest, in order; `view_length` `[B, H]`: the rows in use of each segment's view)."""
    segs = store.tables.layer_segments(layer_idx, store.num_layers, store.num_kv_heads)
    slots, valid = store.tables.padded_slots(segs)
    if mass_new is None:
        mass = mass_view[..., : slots.shape[2]]
    else:
        batch, heads, fresh = mass_new.shape
        length = view_length
        view_valid = torch.arange(mass_view.shape[2], device=length.device) < length[..., None]
        real = torch.ones(batch, fresh, dtype=torch.bool, device=length.device) if new_valid is None else new_valid
        kept = torch.cat([view_valid, real[:, None, :].expand(batch, heads, fresh)], -1)
        mass = _compact(kept, torch.cat([mass_view, mass_new], -1))
    return LayerAttention(slots, valid, mass, _new_slots(store, forward, layer_idx))


def from_decode_views(store, forward: ForwardContext, masses: list[torch.Tensor]) -> LayerAttention:
    """The CPU decode path for every layer at once: `masses[l]` is layer l's `[B, H, C_l]` mass over
    its view rows (`attend_view_with_mass`), the view holding each segment's entries first. One
    slot lookup per forward instead of one per layer: the bookkeeping a decode step pays for reading
    attention statistics stays a few tensor ops, however deep the model."""
    slots, valid = store.tables.padded_slots(store.tables.all_layer_segments(store.num_layers, store.num_kv_heads))
    mass = masses[0].new_zeros(slots.shape)
    for layer, layer_mass in enumerate(masses):
        columns = min(layer_mass.shape[-1], mass.shape[-1])
        mass[layer, ..., :columns] = layer_mass[..., :columns]
    return LayerAttention(slots, valid, mass, _new_slots(store, forward, None))


def _compact(valid: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` `[B, H, N]` with its valid entries moved to the front (order kept), padded with 0 to the
    most valid entries of any row."""
    rank = valid.cumsum(-1) - 1
    longest = int(valid.sum(-1).max()) if valid.numel() else 0
    index = torch.where(valid, rank, longest)  # invalid ones land in a spare last column
    dest = value.new_zeros(*value.shape[:-1], longest + 1)
    return dest.scatter_(-1, index, torch.where(valid, value, 0))[..., :longest]


def _new_slots(store, forward: ForwardContext, layer_idx: int | None) -> torch.Tensor:
    new = forward.new_slots(layer_idx)
    return torch.empty(0, dtype=torch.int64, device=store.device) if new is None else new.flatten().to(torch.int64)
