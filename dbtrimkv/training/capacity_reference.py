"""Plain `O(T^2)` capacity loss, written as directly as the formulas: the reference for tests.

Why: `capacity.py` chunks the computation and hand-writes its backward pass; this version builds
the full `[T, T]` decay matrix and lets autograd differentiate it, so the two can be compared on
values and gradients. Same arguments and meaning as `capacity.capacity_loss`.
"""

from __future__ import annotations

import torch


def capacity_loss_reference(log_beta: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                            memory_size: int, mode: str = "global") -> torch.Tensor:
    layers, batch, length, heads = log_beta.shape
    t = torch.arange(length)
    age = (t[:, None] - t[None, :]).float()  # age[t, i] = t - i
    start = t[None, :] - positions  # [B, T]
    same_sequence = (t[None, None, :] >= start[:, :, None]) & (age[None] >= 0)  # [B, t, i]
    lb = log_beta.permute(1, 0, 3, 2).float()  # [B, L, H, i]
    decay = torch.exp(age.clamp(min=0)[None, None, None] * lb[:, :, :, None, :])  # [B, L, H, t, i]
    mass = (decay * same_sequence[:, None, None]).sum(-1)  # S_t: [B, L, H, t]
    room = (positions - memory_size).float()  # t - M
    real = valid.float()
    if mode == "head":
        hinge = torch.clamp(mass - memory_size, min=0) / torch.clamp(room, min=1)[:, None, None]
        return (hinge * real[:, None, None]).sum() / (real.sum() * layers * heads)
    total = mass.sum(dim=(1, 2))  # G_t: [B, t]
    hinge = torch.clamp(total - memory_size * layers * heads, min=0) / torch.clamp(room * layers * heads, min=1)
    return (hinge * real).sum() / real.sum()
