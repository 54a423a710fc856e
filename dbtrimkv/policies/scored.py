"""Shared machinery of the baseline policies (streaming, SnapKV, H2O, key norm, random).

Why: baselines must run in the same engine as the learned policies (same budget accounting, same
slot pool) to make comparisons fair. None of them ranks by learned retention: each computes its
own score per pool slot and calls `evict_by_slot_scores`. As in their papers, they split the
budget evenly over (layer, KV head) segments; their scores are not comparable across heads.

Attention-statistics policies need the attention probabilities of the queries over the cached
keys, which the attention kernel never materialises; `attention_mass` recomputes them from the
queries that `observe_attention` receives, in blocks of queries to bound memory. Per-slot state
lives in the cache's typed `policy_scores` field (not the policy), which `reset()` clears and
`clone()` copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import EvictionPolicy

QUERY_BLOCK = 256  # queries per block when recomputing attention probabilities


@dataclass
class PerHeadScorePolicy(EvictionPolicy):
    """Each (layer, KV head) keeps budget / (L * H) entries, ranked by `slot_scores` (higher stays)."""

    def group_size(self, num_layers, num_kv_heads):
        return 1

    def check_budget(self, budget, num_layers, num_kv_heads):
        if budget < num_layers * num_kv_heads:
            raise ConfigError(f"budget {budget} is below one entry per (layer, head) ({num_layers * num_kv_heads}) "
                              f"for policy {self.name!r}")

    def slot_scores(self, cache) -> torch.Tensor:
        """A score per pool slot (only the cached slots are read)."""
        raise NotImplementedError

    @torch.no_grad()
    def evict(self, cache, sequences):
        return self.evict_by_slot_scores(cache, sequences, self.slot_scores(cache))


def slot_state(cache) -> torch.Tensor:
    """The policy's float32 value per pool slot (`cache.policy_scores`, zeros for new capacity)."""
    state = cache.policy_scores
    capacity = cache.pool.capacity
    if state is None:
        return torch.zeros(capacity, dtype=torch.float32, device=cache.device)
    if state.numel() < capacity:
        state = torch.cat([state, state.new_zeros(capacity - state.numel())])
    return state


def layer_entries(cache, layer_idx: int):
    """The cached entries of one layer as padded `[B, H, Lmax]` slot ids, positions and a validity mask."""
    segs = cache.tables.layer_segments(layer_idx, cache.num_layers, cache.num_kv_heads)
    slots, valid = cache.tables.padded_slots(segs)
    pos = torch.where(valid, cache.pool.pos[slots].to(torch.int64), -1)
    return slots, pos, valid


def attention_mass(cache, query: torch.Tensor, query_pos: torch.Tensor, slots, key_pos, valid) -> torch.Tensor:
    """Attention probability each cached entry receives, summed over the given queries and over the query
    heads that share its KV head: `[B, H, Lmax]`. `query`: `[B, Hq, T, D]`; `query_pos` `[B, T]`
    (-1 = not counted). Softmax as in attention (scale 1/sqrt(head_dim), entries with position <= the
    query's), so the sums are exactly what those queries attended with."""
    counted_columns = (query_pos >= 0).any(0)  # e.g. only SnapKV's window: skip the others' logits
    query, query_pos = query[:, :, counted_columns], query_pos[:, counted_columns]
    batch, num_q, _, dim = query.shape
    group = num_q // cache.num_kv_heads
    keys = cache.pool.k.index_select(0, slots.flatten()).view(*slots.shape, -1).to(torch.float32)  # [B, H, L, D]
    keys = keys.repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    mass = torch.zeros(batch, num_q, keys.shape[2], dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[2], QUERY_BLOCK):
        q = query[:, :, start : start + QUERY_BLOCK].to(torch.float32)
        qp = query_pos[:, start : start + QUERY_BLOCK].to(torch.int64)
        logits = torch.einsum("bhtd,bhld->bhtl", q, keys) * dim**-0.5
        visible = valid[:, :, None, :] & (key_pos[:, :, None, :] <= qp[:, None, :, None])  # [B, H, t, L]
        visible = visible.repeat_interleave(group, dim=1)
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        counted = (qp >= 0)[:, None, :, None]
        mass += (probs * counted).sum(2)
    return mass.view(batch, cache.num_kv_heads, group, -1).sum(2)
