"""`KVViews`: contiguous per-layer copies of the cached K/V, for attention on CPU.

Why: the slot pool scatters a segment's rows, so attending through the slot tables means
gathering every kept row again at every decode step, although they only change when an eviction
does. The views hold, for every layer, the cached entries of each (sequence, KV head) as the first
`length[l, b, h]` rows of `k[l, b, h]` / `v[l, b, h]` (in table order, i.e. position order), plus
an additive validity bias for SDPA. They are rebuilt from the pool (one gather for all layers)
only when they are stale: after an eviction or a multi-token forward (whose new rows the views do
not mirror), or when a decode step finds no spare column. A decode step writes its new rows into
the pool and the views alike.

Memory: `L * B * H * (longest segment + headroom)` entries, where headroom is
`max(buffer_size, longest // 8)`, freed and rebuilt rather than grown. With a budget this is about
the kept entries (plus the padding of ragged segments); with a budget that holds everything it is
a second copy of the cache. The slot pool stays the source of truth (policies, eviction, clones
and the GPU kernels read it); the views are derived state, dropped by `invalidate()`.
"""

from __future__ import annotations

import torch

from .view_attention import validity_bias


class KVViews:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: torch.Tensor | None = None  # [L, B, H, C, D]
        self.v: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None  # [L, B, H, 1, C], 0 valid / dtype min
        self.length: torch.Tensor | None = None  # [L, B, H] int64 rows in use
        self.spare = 0  # columns every segment still has free (host count, no device read)
        self._append_at: torch.Tensor | None = None  # [L, N*H] the decode step's cells (`plan_append`)
        self._longest: list[int] | None = None  # rows in use of each layer's longest segment (read once)

    @property
    def stale(self) -> bool:
        return self.k is None

    def invalidate(self) -> None:
        """Drop the views (after an eviction, or a forward whose new rows they do not hold)."""
        self.k = self.v = self.bias = self.length = None
        self.spare = 0
        self._append_at = None
        self._longest = None

    def storage_bytes(self) -> int:
        """Bytes the views hold now: every tensor they keep (`planned_bytes` must count the same)."""
        tensors = [t for t in (self.k, self.v, self.bias, self.length) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)  # (the decode step's cell index is not storage)

    @staticmethod
    def columns_for(used: int, headroom: int) -> int:
        """Columns `rebuild` gives views whose longest segment holds `used` rows."""
        return used + max(headroom, used // 8, 1)

    @staticmethod
    def planned_bytes(num_layers: int, batch: int, heads: int, columns: int, dim: int, dtype: torch.dtype) -> int:
        """Bytes `storage_bytes` reports for views of `columns` columns (what a memory limit must allow):
        K and V, the bias (one per column) and the row counts (int64, one per segment)."""
        element = torch.empty(0, dtype=dtype).element_size()
        segments = num_layers * batch * heads
        return segments * (columns * (2 * dim + 1) * element + 8)

    def rebuild(self, pool, slots: torch.Tensor, valid: torch.Tensor, headroom: int) -> None:
        """Copy the entries `slots[l, b, h, :n]` (padded `[L, B, H, n]`, `valid` marks real ones) out of
        the pool, leaving `headroom` spare columns (at least n // 8) for decode steps."""
        self.invalidate()
        num_layers, batch, heads, used = slots.shape
        columns = self.columns_for(used, headroom)
        spare = columns - used
        dim = pool.k.shape[1]
        make = pool.k.new_empty if used else pool.k.new_zeros
        self.k = make(num_layers, batch, heads, columns, dim)
        self.v = make(num_layers, batch, heads, columns, dim)
        if used:  # one pass per tensor; padding columns copy some pool row (finite), the bias hides them
            index = torch.nn.functional.pad(slots, (0, spare)).flatten()
            torch.index_select(pool.k, 0, index, out=self.k.view(-1, dim))
            torch.index_select(pool.v, 0, index, out=self.v.view(-1, dim))
        self.length = valid.sum(-1)
        self.bias = validity_bias(self.length, columns, pool.k.dtype)
        self.spare = spare

    def plan_append(self, token_batch: torch.Tensor) -> None:
        """A decode forward adds one row to the segments of the sequences `token_batch` `[N]` in every
        layer: reserve their columns and mark them valid now (each layer writes its rows in `append`).
        The reserved cells are kept as flat row indices `[L, N*H]` into `k[l].view(-1, D)` (one
        `index_copy_` per layer and tensor in `append`)."""
        heads, columns = self.bias.shape[2], self.bias.shape[-1]
        segment = token_batch[:, None] * heads + torch.arange(heads, device=token_batch.device)  # [N, H] in b*H + h
        column = self.length[:, token_batch, :]  # [L, N, H]
        flat = (segment[None] * columns + column).flatten(1)  # [L, N*H] cells of one layer's [B*H*C] rows
        self.bias.view(self.num_layers, -1).scatter_(1, flat, 0.0)
        self.length[:, token_batch, :] = column + 1
        self.spare -= 1
        self._longest = None
        self._append_at = flat

    def longest(self, layer: int) -> int:
        """Rows in use of the longest segment of one layer (one host read per forward for all layers)."""
        if self._longest is None:
            self._longest = self.length.flatten(1).amax(1).tolist() if self.length.numel() else [0] * self.num_layers
        return self._longest[layer]

    def append(self, layer: int, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """Write this decode step's rows `[N, H, D]` of one layer into the columns `plan_append` reserved."""
        cells, dim = self._append_at[layer], self.k.shape[-1]
        self.k[layer].view(-1, dim).index_copy_(0, cells, k_rows.reshape(-1, dim).to(self.k.dtype))
        self.v[layer].view(-1, dim).index_copy_(0, cells, v_rows.reshape(-1, dim).to(self.v.dtype))
