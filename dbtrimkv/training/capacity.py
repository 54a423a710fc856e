"""Capacity loss: push the retained mass `S_t` under the memory budget.

Why: distillation alone is happiest with beta = 1 (nothing forgotten). The budget enters training
through `S_t = sum_{i <= t} beta_i^(t - i)`, the soft count of entries a (layer, KV head) still
holds at step `t`; it is what eviction has to cut down to `M` entries. Hinge penalties:

- `head` (TRIM-KV): mean over (layer, head, t) of `max(0, (S_t - M) / max(t - M, 1))`;
- `global` (DBTrimKV): `G_t = sum over layers and heads of S_t` against `M * L * H`, i.e.
  `max(0, (G_t - M L H) / max((t - M) L H, 1))`, mean over t. Heads and layers may trade
  capacity, as the global top-k at inference does.

`t` is the 0-based position of the token within its own sequence (padding excluded, a packed row
holds several sequences), so `t - M` bounds the possible excess. Means run over real tokens only.

`S_t` costs `O(T^2)` exponentials whatever we do (every key decays at its own rate, so there is no
recurrence). `RetentionMass` computes them in query chunks and recomputes each chunk in the
backward pass, so memory is `O(T * chunk)` per (layer, head), not `O(T^2)`. The plain `O(T^2)`
reference lives in `capacity_reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAPACITY_MODES = ("head", "global")
CHUNK_ELEMENTS = 1 << 26  # float32 elements per chunk of decay weights (256 MiB)


class RetentionMass(torch.autograd.Function):
    """`S[b, n, t] = sum_{start[b, t] <= i <= t} exp((t - i) * x[b, n, i])`, in query chunks."""

    @staticmethod
    def forward(ctx, x, start, chunk: int):
        mass = torch.empty_like(x)
        for q0, q1, lo, weights, _ in _chunks(x, start, chunk):
            mass[:, :, q0:q1] = weights.sum(-1)
        ctx.save_for_backward(x, start)
        ctx.chunk = chunk
        return mass

    @staticmethod
    def backward(ctx, grad_mass):
        x, start = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        for q0, q1, lo, weights, age in _chunks(x, start, ctx.chunk):
            # d S_t / d x_i = (t - i) * beta_i^(t - i)
            grad_x[:, :, lo:q1] += (weights * age * grad_mass[:, :, q0:q1, None]).sum(-2)
        return grad_x, None, None


def _chunks(x, start, chunk: int):
    """Per query chunk `[q0, q1)`: the decay weights `[B, N, q1 - q0, q1 - lo]` and ages over keys `[lo, q1)`."""
    steps = torch.arange(x.shape[-1], device=x.device)
    earliest = start.amin(0).cpu()  # one host sync, not one per chunk
    for q0 in range(0, x.shape[-1], chunk):
        q1 = min(q0 + chunk, x.shape[-1])
        lo = int(earliest[q0:q1].min())  # keys before every query's sequence start play no part
        age = (steps[q0:q1, None] - steps[None, lo:q1]).float()  # [c, k]
        keep = (age >= 0) & (steps[None, None, lo:q1] >= start[:, q0:q1, None])  # [B, c, k]
        weights = torch.exp(age.clamp(min=0) * x[:, :, None, lo:q1]) * keep[:, None]
        yield q0, q1, lo, weights, age.clamp(min=0)


def retention_mass(log_beta: torch.Tensor, positions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`S_t` for `log_beta` `[B, N, T]` (N = layers x heads) and `positions` `[B, T]` within each sequence."""
    x = log_beta.float()
    steps = torch.arange(x.shape[-1], device=x.device)
    start = steps[None, :] - positions  # index where each token's own sequence starts
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1] * x.shape[2]))
    return RetentionMass.apply(x, start, chunk)


@dataclass
class Capacity:
    """The loss and what it is made of, for logging."""

    loss: torch.Tensor
    mean_mass_ratio: torch.Tensor  # mean over (layer, head, t) of S_t / M


def capacity_loss(log_beta: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, memory_size: int,
                  mode: str = "global", chunk: int | None = None) -> Capacity:
    """Capacity loss of `log_beta` `[L, B, T, H]` (as stacked from the layers' gate outputs).

    `positions` `[B, T]`: 0-based position of each token within its sequence; `valid` `[B, T]`:
    True for real tokens.
    """
    if mode not in CAPACITY_MODES:
        raise ValueError(f"unknown capacity mode {mode!r}; choose one of {', '.join(CAPACITY_MODES)}")
    layers, batch, length, heads = log_beta.shape
    x = log_beta.permute(1, 0, 3, 2).reshape(batch, layers * heads, length)
    mass = retention_mass(x, positions, chunk)  # [B, N, T]
    n = layers * heads
    weight = valid.float()
    excess_room = (positions - memory_size).float()
    if mode == "head":
        hinge = torch.relu(mass - memory_size) / excess_room.clamp(min=1)[:, None]
        loss = (hinge * weight[:, None]).sum() / (weight.sum() * n).clamp(min=1)
    else:
        hinge = torch.relu(mass.sum(1) - memory_size * n) / (excess_room * n).clamp(min=1)
        loss = (hinge * weight).sum() / weight.sum().clamp(min=1)
    ratio = (mass.detach() * weight[:, None]).sum() / ((weight.sum() * n).clamp(min=1) * memory_size)
    return Capacity(loss, ratio)
