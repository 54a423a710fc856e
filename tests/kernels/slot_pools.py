"""Random slot pools in the kernels' storage layout (CSR slot tables over a shuffled pool).

Shared by the kernel tests: every case builds fresh, never-zero inputs from its own seed, with
empty and length-1 segments, slack after each segment's table and scattered slot ids.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SlotPool:
    log_beta: torch.Tensor  # [S] float32
    pos: torch.Tensor  # [S] int32
    keys: torch.Tensor  # [S, D]
    values: torch.Tensor  # [S, D]
    table: torch.Tensor  # [T] int32
    seg_start: torch.Tensor  # [n_seg] int64
    seg_len: torch.Tensor  # [n_seg] int32
    free_slots: torch.Tensor  # [S] int32
    free_top: torch.Tensor  # [1] int64
    seen: torch.Tensor  # [B] int64
    batch: int
    num_layers: int
    num_kv_heads: int

    @property
    def num_segments(self) -> int:
        return self.seg_len.numel()

    def clone(self) -> SlotPool:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)}
        )

    def segment_slots(self, s: int) -> list[int]:
        start, n = int(self.seg_start[s]), int(self.seg_len[s])
        return self.table[start:start + n].tolist()

    def free_list(self) -> list[int]:
        return sorted(self.free_slots[: int(self.free_top)].tolist())

    def select_args(self):
        """Positional arguments of `select_and_compact` up to `seen`."""
        return (self.log_beta, self.pos, self.table, self.seg_start, self.seg_len, self.free_slots, self.free_top,
                self.seen)

    def attention_args(self):
        """Pool arguments of `ragged_attention` after `q, q_pos`."""
        return self.keys, self.values, self.pos, self.table, self.seg_start, self.seg_len


def random_slot_pool(seed: int, batch: int, num_layers: int, num_kv_heads: int, max_len: int, device,
                     *, log_beta_choices=None, position_stride: int = 1, dim: int = 16,
                     dtype=torch.float32, free_extra: int = 8) -> SlotPool:
    """A pool whose segments hold 0..max_len entries (segment 0 empty, segment 1 of length 1).

    `log_beta_choices` draws log beta from a small set (exact ties); `position_stride` spreads
    positions (and `seen`) by that factor, to reach large positions.
    """
    gen = torch.Generator().manual_seed(seed)
    n_seg = batch * num_layers * num_kv_heads
    lens = torch.randint(0, max_len + 1, (n_seg,), generator=gen)
    lens[0] = 0
    if n_seg > 1:
        lens[1] = 1
    capacity = lens + torch.randint(0, 4, (n_seg,), generator=gen)
    seg_start = torch.cumsum(capacity, 0) - capacity
    num_slots = int(lens.sum()) + free_extra
    shuffled = torch.randperm(num_slots, generator=gen).to(torch.int32)
    window = 2 * max_len + 3
    seen = (window + torch.randint(0, max_len + 1, (batch,), generator=gen)) * position_stride
    table = torch.full((int(capacity.sum()),), -5, dtype=torch.int32)
    pos = torch.full((num_slots,), -3, dtype=torch.int32)
    used = 0
    for s in range(n_seg):
        n, b = int(lens[s]), s // (num_layers * num_kv_heads)
        recent = window - 1 - torch.sort(torch.randperm(window, generator=gen)[:n], descending=True).values
        slots = shuffled[used:used + n]
        used += n
        table[int(seg_start[s]):int(seg_start[s]) + n] = slots
        pos[slots.long()] = (int(seen[b]) - window * position_stride + recent * position_stride).to(torch.int32)
    if log_beta_choices is None:
        log_beta = -(torch.rand(num_slots, generator=gen) * 0.4 + 1e-3)
    else:
        choices = torch.tensor(log_beta_choices, dtype=torch.float32)
        log_beta = choices[torch.randint(0, len(choices), (num_slots,), generator=gen)]
    free_slots = torch.full((num_slots,), -1, dtype=torch.int32)
    free_slots[:free_extra] = shuffled[used:]
    return SlotPool(
        log_beta=log_beta.to(device),
        pos=pos.to(device),
        keys=torch.randn(num_slots, dim, generator=gen).to(device=device, dtype=dtype),
        values=torch.randn(num_slots, dim, generator=gen).to(device=device, dtype=dtype),
        table=table.to(device),
        seg_start=seg_start.to(device),
        seg_len=lens.to(torch.int32).to(device),
        free_slots=free_slots.to(device),
        free_top=torch.tensor([free_extra], dtype=torch.int64, device=device),
        seen=seen.to(torch.int64).to(device),
        batch=batch,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
    )
