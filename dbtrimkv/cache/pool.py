"""`SlotPool`: one token-slot store for every layer, KV head and sequence of a batch.

Why: evicting from per-layer dense tensors means re-copying the cache; with a slot pool
(SGLang-style, page size 1) a cached entry is written once and never moves. Each slot holds one
(layer, head, token) entry: its K and V vectors, `log beta`, logical position and modality.
Free slots live on a stack. The pool grows on demand, never beyond the limit the cache gives it.
"""

from __future__ import annotations

import torch


class SlotPool:
    def __init__(self, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.capacity = 0
        self.k = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.log_beta = torch.empty(0, dtype=torch.float32, device=device)
        self.pos = torch.empty(0, dtype=torch.int32, device=device)
        self.modality = torch.empty(0, dtype=torch.int8, device=device)
        self.free_slots = torch.empty(0, dtype=torch.int32, device=device)
        self.free_top = torch.zeros(1, dtype=torch.int64, device=device)  # kernels push onto it
        self.num_free = 0  # host mirror of free_top

    def storage_bytes(self) -> int:
        """Bytes of the allocated K and V storage."""
        return 2 * self.capacity * self.head_dim * self.k.element_size()

    def ensure_free(self, needed: int, limit: int | None) -> None:
        """Grow (by at least half, or straight to `limit` when that is under twice what is needed) so that
        `needed` slots are free; capacity never exceeds `limit`."""
        if needed <= self.num_free:
            return
        want = self.capacity - self.num_free + needed
        new_capacity = max(want, self.capacity + self.capacity // 2)
        if limit is not None:
            if limit <= 2 * want:  # most of the bound is needed now: take all of it, never copy again
                new_capacity = limit
            new_capacity = min(new_capacity, max(limit, want))
        self._grow(new_capacity)

    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        for name in ("k", "v", "log_beta", "pos", "modality"):
            tensor = getattr(self, name)
            grown = torch.zeros((new_capacity, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
            grown[:old] = tensor
            setattr(self, name, grown)
        free = torch.empty(new_capacity, dtype=torch.int32, device=self.device)
        free[: self.num_free] = self.free_slots[: self.num_free]
        # new slots go on top in reverse, so they are handed out in increasing order
        free[self.num_free : self.num_free + new_capacity - old] = torch.arange(
            new_capacity - 1, old - 1, -1, dtype=torch.int32, device=self.device
        )
        self.free_slots = free
        self.num_free += new_capacity - old
        self.free_top.fill_(self.num_free)
        self.capacity = new_capacity

    def pop(self, count: int) -> torch.Tensor:
        """Take `count` free slots (int64 ids)."""
        if count > self.num_free:
            raise RuntimeError(f"slot pool exhausted: need {count}, {self.num_free} free")
        self.num_free -= count
        self.free_top.fill_(self.num_free)
        return self.free_slots[self.num_free : self.num_free + count].to(torch.int64).flip(0)

    def released(self, count: int) -> None:
        """Account for `count` slots a kernel pushed onto the free stack."""
        self.num_free += count

    def release(self, slots: torch.Tensor) -> None:
        """Push `slots` (no longer referenced by any table) back onto the free stack."""
        count = slots.numel()
        self.free_slots[self.num_free : self.num_free + count] = slots.to(torch.int32)
        self.num_free += count
        self.free_top.fill_(self.num_free)

    def write_positions(self, slots: torch.Tensor, pos: torch.Tensor, modality: torch.Tensor) -> None:
        """Logical positions and modality codes `[n]` of new entries at the flat slot ids `slots` `[n]`."""
        self.pos.index_copy_(0, slots, pos.to(torch.int32))
        self.modality.index_copy_(0, slots, modality.to(torch.int8))

    def write_rows(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor | None) -> None:
        """K, V `[n, D]` and log beta `[n]` (None: written later) of new entries at the flat slot ids `slots` `[n]`."""
        self.k.index_copy_(0, slots, k.to(self.dtype))
        self.v.index_copy_(0, slots, v.to(self.dtype))
        if log_beta is not None:
            self.log_beta.index_copy_(0, slots, log_beta.to(torch.float32))

    def clone(self) -> "SlotPool":
        other = SlotPool(self.head_dim, self.dtype, self.device)
        for name in ("k", "v", "log_beta", "pos", "modality", "free_slots", "free_top"):
            setattr(other, name, getattr(self, name).clone())
        other.capacity, other.num_free = self.capacity, self.num_free
        return other
