"""`AttentionBackend`: how a cache's layers write their new K/V and attend over the stored entries.

Why: the attention path is one role, apart from what is stored (`store.py`) and from the
transformers adapter (`cache.py`). On CUDA (Triton) the ragged kernel reads the slot pool in place
through the slot tables. On CPU the backend keeps `KVViews`, contiguous per-layer copies of the
cached K/V that only an eviction or a multi-token forward makes stale (`view_attention.py`: the
cached entries need no causal mask, only the new tokens do). The views are a second copy of the
kept entries: `views_limit` caps their bytes (a server sizes pool and views together); a forward
whose views would exceed it attends through the slot tables instead (the torch reference kernel:
same contract, no copy kept). A policy that reads attention statistics gets them from here
(`attention_stats.py`), computed with the attention on CPU, recomputed from the pool otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import ragged_attention
from ..kernels.dispatch import backend_for
from ..policies.view import LayerAttention
from .attention_stats import from_decode_views, from_pool, from_views
from .forward_plan import ForwardContext
from .store import KVStore
from .view_attention import attend_view, attend_view_and_new, attend_view_with_mass, attention_mass
from .views import KVViews

Observer = Callable[[int | None, LayerAttention], None]  # the policy's `observe_attention` for this cache


def uses_views(pool_tensor: torch.Tensor) -> bool:
    """Does a cache whose pool holds tensors like this attend over `KVViews` (CPU, torch kernels)?"""
    return pool_tensor.device.type == "cpu" and backend_for(pool_tensor) == "torch"


class AttentionBackend:
    def __init__(self, store: KVStore, headroom: int, views_limit: int | None = None):
        self.store = store
        self.headroom = headroom  # spare view columns for decode steps (the cache's buffer_size)
        self.views: KVViews | None = KVViews(store.num_layers)  # None once the kernels read the pool
        self.views_limit = views_limit  # most bytes the views may take (None: no limit)
        self.views_skipped = 0  # forwards that attended through the pool because the views would pass the limit
        self._views_outdated = False  # the last forward added rows the views do not hold

    def bind_pool(self) -> None:
        """The store has its pool: keep the views only where they are the attention path."""
        if not uses_views(self.store.pool.k):
            self.views = None

    def drop_views(self) -> None:
        """Attend through the slot tables from now on, like the kernels (the reference path on CPU)."""
        self.views = None

    def set_views_limit(self, limit: int | None) -> None:
        """Cap the views' bytes (a server re-sizes it as rows come and go)."""
        self.views_limit = limit

    def invalidate(self) -> None:
        """The stored entries changed outside a forward (eviction, rows added or removed)."""
        if self.views is not None:
            self.views.invalidate()

    def views_bytes(self) -> int:
        views = self.views  # (read once: /metrics asks from another thread while the engine may drop them)
        return views.storage_bytes() if views is not None else 0

    def prepare(self, plan, decode: bool) -> bool:
        """Before the store appends this forward's entries: whether it attends over the views. Rebuild
        them from the slot tables if they miss entries; a decode step then reserves its new column in
        every layer's view. False (views dropped) when the rebuilt views would take more than
        `views_limit` bytes: this forward reads the pool."""
        views, store = self.views, self.store
        if views is None:
            return False
        if views.stale or self._views_outdated or (decode and views.spare < 1):
            slots, valid = store.tables.padded_slots(store.tables.all_layer_segments(store.num_layers,
                                                                                     store.num_kv_heads))
            if self.views_limit is not None and KVViews.planned_bytes(
                    *slots.shape[:3], KVViews.columns_for(slots.shape[3], self.headroom), store.head_dim,
                    store.pool.dtype) > self.views_limit:
                views.invalidate()
                self.views_skipped += 1
                return False
            views.rebuild(store.pool, slots, valid, headroom=self.headroom)
        self._views_outdated = not decode  # a multi-token forward's rows are not mirrored
        if decode and plan.token_batch.numel():
            views.plan_append(plan.token_batch)
        return True

    def write(self, forward: ForwardContext, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
              log_beta: torch.Tensor | None) -> None:
        """Write one layer's new real (non-padding) tokens' K/V and log beta (None: deferred, the store
        writes it later) into their pool slots (and, decoding over the views, into the views); a
        multi-token forward over the views keeps its K/V for `attend`."""
        plan = forward.plan
        if forward.slots is not None:
            slots = forward.slots[layer_idx].flatten()
            if forward.padded:
                tok_b, tok_j = plan.token_batch, plan.token_column
                k_rows, v_rows = key_states[tok_b, :, tok_j], value_states[tok_b, :, tok_j]
                beta_rows = log_beta[tok_b, tok_j] if log_beta is not None else None
            else:  # every column is a real token: (row, column) order is a reshape
                batch, heads, length, dim = key_states.shape
                k_rows = key_states.transpose(1, 2).reshape(batch * length, heads, dim)
                v_rows = value_states.transpose(1, 2).reshape(batch * length, heads, dim)
                beta_rows = log_beta
            self.store.pool.write_rows(slots, k_rows.reshape(slots.numel(), -1), v_rows.reshape(slots.numel(), -1),
                                       beta_rows.reshape(-1) if beta_rows is not None else None)
            if forward.views_now and key_states.shape[2] == 1:
                self.views.append(layer_idx, k_rows, v_rows)
        if forward.views_now and key_states.shape[2] > 1:
            forward.new_kv[layer_idx] = (key_states, value_states)

    def attend(self, forward: ForwardContext, layer_idx: int, query: torch.Tensor, scale: float,
               observe: Observer) -> torch.Tensor:
        """Attention of this forward's queries `[B, Hq, T, D]` over the layer's cached entries; the
        statistics a policy counts go to `observe`."""
        if forward.views_now:
            return self._attend_views(forward, layer_idx, query, scale, observe)
        store = self.store
        if forward.counted is not None:
            observe(layer_idx, from_pool(store, forward, layer_idx, query, scale))
        t, pool = store.tables, store.pool
        return ragged_attention(query, forward.plan.query_positions, pool.k, pool.v, pool.pos,
                                t.table, t.seg_start, t.seg_len, layer_idx, store.num_layers, scale)

    def _attend_views(self, forward: ForwardContext, layer_idx: int, query: torch.Tensor, scale: float,
                      observe: Observer) -> torch.Tensor:
        """CPU path: attention over the layer's contiguous view plus this forward's own K/V."""
        views, dtype, counted = self.views, query.dtype, forward.counted
        q_valid = forward.plan.query_positions >= 0 if forward.padded else None
        used = views.longest(layer_idx)  # columns past every segment's length are spare: not attended
        k, v = views.k[layer_idx, :, :, :used].to(dtype), views.v[layer_idx, :, :, :used].to(dtype)
        bias = views.bias[layer_idx, ..., :used].to(dtype)
        if query.shape[2] == 1:  # decode: the new token is in the view already
            if counted is None:
                return attend_view(query, q_valid, k, v, bias, scale)
            out, mass = attend_view_with_mass(query, q_valid, k, v, bias, scale, counted)
            forward.decode_mass.append(mass)
            if layer_idx == self.store.num_layers - 1:  # the policy reads every layer's statistics at once
                observe(None, from_decode_views(self.store, forward, forward.decode_mass))
            return out
        k_new, v_new = forward.new_kv.pop(layer_idx)
        pool_dtype = self.store.pool.dtype  # attend to exactly what the pool stores
        k_new, v_new = k_new.to(pool_dtype), v_new.to(pool_dtype)
        if counted is not None:
            mass = attention_mass(query, counted, views.k[layer_idx, :, :, :used], views.length[layer_idx], k_new,
                                  q_valid, scale)
            observe(layer_idx, from_views(self.store, forward, views.length[layer_idx], layer_idx, *mass, q_valid))
        return attend_view_and_new(query, q_valid, k, v, bias, k_new.to(dtype), v_new.to(dtype), scale)

    def clone(self, store: KVStore) -> "AttentionBackend":
        """A backend for a copied store: same limit and counters, views rebuilt on its first forward."""
        other = AttentionBackend(store, self.headroom, self.views_limit)
        other.views_skipped = self.views_skipped
        if self.views is None:
            other.views = None
        return other
