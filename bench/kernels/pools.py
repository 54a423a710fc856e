"""Benchmark-sized slot pools, built with vectorised torch ops (no per-segment Python loop).

Every segment holds `entries` rows; slot ids are a random permutation of the pool (rows of one
segment are scattered, as after many evictions), positions increase with random gaps.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class BenchPool:
    log_beta: torch.Tensor
    pos: torch.Tensor
    table: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    free_slots: torch.Tensor
    free_top: torch.Tensor
    seen: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def mutable(self) -> tuple[torch.Tensor, ...]:
        """The tensors select-and-compact mutates (to restore between timed calls)."""
        return self.table, self.seg_len, self.free_slots, self.free_top


def bench_pool(batch: int, num_layers: int, num_kv_heads: int, entries: int, device, *, dim: int = 0,
               dtype=torch.bfloat16, seed: int = 0) -> BenchPool:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_seg = batch * num_layers * num_kv_heads
    num_slots = n_seg * entries
    gaps = torch.randint(1, 4, (n_seg, entries), generator=gen, dtype=torch.int32)
    pos = (torch.cumsum(gaps, 1) - 1).to(torch.int32)  # [n_seg, entries], increasing per segment
    seen = pos.view(batch, -1).amax(1).to(torch.int64) + 1
    slots = torch.randperm(num_slots, generator=gen).to(torch.int32)
    pool_pos = torch.empty(num_slots, dtype=torch.int32)
    pool_pos[slots.long()] = pos.flatten()
    pool = BenchPool(
        log_beta=-(torch.rand(num_slots, generator=gen) * 0.05 + 1e-4),
        pos=pool_pos,
        table=slots,
        seg_start=torch.arange(n_seg, dtype=torch.int64) * entries,
        seg_len=torch.full((n_seg,), entries, dtype=torch.int32),
        free_slots=torch.full((num_slots,), -1, dtype=torch.int32),
        free_top=torch.zeros(1, dtype=torch.int64),
        seen=seen,
    )
    pool = BenchPool(**{f.name: None if getattr(pool, f.name) is None else getattr(pool, f.name).to(device)
                        for f in dataclasses.fields(pool)})
    if dim:
        pool.keys = torch.randn(num_slots, dim, device=device, dtype=dtype)
        pool.values = torch.randn(num_slots, dim, device=device, dtype=dtype)
    return pool
