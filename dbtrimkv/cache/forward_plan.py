"""`ForwardPlan` and `ForwardContext`: everything one language-model forward needs, in one object.

Why: every layer of a forward appends the same tokens at the same logical positions and attends
with the same query positions; the plan is worked out once, before layer 0, from the padding mask
and the tokens each sequence has seen, and read by every layer's `update` and `attend` (and by
policies that observe attention). The `ForwardContext` wraps the plan with the rest of the
forward's state (the slots its entries took, whether it attends over the CPU views, the queries
a policy counts, and the per-layer hand-offs between the hooks, `update` and `attend`). It is
created before layer 0 and dropped with the forward: no long-lived object carries per-forward
scratch, so a cache copied between forwards (`clone()`) has nothing to reset (nano-vllm's typed
per-step context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ForwardPlan:
    """The real tokens of a forward over a `[B, T]` input, flattened in (row, column) order."""

    token_batch: torch.Tensor  # [N] row b of each real token
    token_column: torch.Tensor  # [N] column j of each real token in the input
    token_rank: torch.Tensor  # [N] index of the token among its row's real tokens of this forward
    token_position: torch.Tensor  # [N] logical position: seen[b] + rank
    token_modality: torch.Tensor  # [N] int8 `Modality` code
    query_positions: torch.Tensor  # [B, T] logical position of every column, -1 for padding
    new_tokens: torch.Tensor  # [B] int64 real tokens per row

    @classmethod
    def build(cls, valid: torch.Tensor, seen: torch.Tensor, modality: torch.Tensor) -> "ForwardPlan":
        """`valid` `[B, T]` bool (False = padding), `seen` `[B]` tokens seen before this forward,
        `modality` `[B, T]` int8 codes."""
        rank = torch.cumsum(valid.to(torch.int64), 1) - 1
        token_batch, token_column = valid.nonzero(as_tuple=True)
        query_positions = torch.where(valid, seen[:, None] + rank, torch.full_like(rank, -1))
        return cls(
            token_batch=token_batch,
            token_column=token_column,
            token_rank=rank[token_batch, token_column],
            token_position=query_positions[token_batch, token_column],
            token_modality=modality[token_batch, token_column],
            query_positions=query_positions,
            new_tokens=valid.sum(1).to(torch.int64),
        )

    @classmethod
    def unpadded(cls, batch: int, length: int, seen: torch.Tensor, modality: torch.Tensor) -> "ForwardPlan":
        """`build` for an input without padding (every decode step of unpadded rows): the same plan from
        aranges, without the mask's cumsum and nonzero (tests/engine/test_forward_plan.py compares them)."""
        column = torch.arange(length, device=seen.device)
        query_positions = seen[:, None] + column
        return cls(
            token_batch=torch.arange(batch, device=seen.device).repeat_interleave(length),
            token_column=column.repeat(batch),
            token_rank=column.repeat(batch),
            token_position=query_positions.flatten(),
            token_modality=modality.flatten(),
            query_positions=query_positions,
            new_tokens=torch.full((batch,), length, dtype=torch.int64, device=seen.device),
        )


@dataclass(frozen=True)
class ForwardContext:
    """One forward of a `DBTrimKVCache`; the dict / list fields are its per-layer hand-offs."""

    plan: ForwardPlan
    slots: torch.Tensor | None  # [L, N, H] pool slots of this forward's new entries (None: no real token)
    padded: bool  # some column is padding
    counted: torch.Tensor | None  # [B, T] queries whose attention the policy reads (None: none)
    views_now: bool  # this forward attends over the CPU views
    staged: dict[int, torch.Tensor | None] = field(default_factory=dict)  # layer -> log beta (None: deferred), until its `update`
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # multi-token: K/V
    decode_mass: list[torch.Tensor] = field(default_factory=list)  # CPU decode: the layers' view masses so far

    def new_slots(self, layer_idx: int | None) -> torch.Tensor | None:
        """Pool slots `[N, H]` of this forward's new entries in one layer (plan token order), `[L, N, H]`
        in every layer for `layer_idx` None; None: none."""
        if self.slots is None or layer_idx is None:
            return self.slots
        return self.slots[layer_idx]
