"""Decode steps over a ragged batch of rows: feed each row's last token, sample, stop per row.

Why: one loop decodes for every path (one chat, a batch of chats, video and evaluation answers), the
server's engine feeding its rows through the same `decode_rows` step. A row feeds one token per step
at its own position (`positions.decode_positions`, its rope delta in the request table); a row that
is done sits the step out (it feeds nothing, so nothing is cached for it). A row is done at a stop
token, after `max_new_tokens`, or when its `done` predicate says so over the token ids it has so
far (e.g. stop strings). The last token sampled is never fed: it is the *pending* token a next turn
feeds first (`pending.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import DBTrimKVCache
from .forward import RowInput, forward_rows
from .positions import decode_positions
from .sampling import Sampler


def decode_rows(model, cache: DBTrimKVCache, tokens: Sequence[int | None]) -> list[RowInput]:
    """The inputs of one decode step: cache row b feeds `tokens[b]` at its next position (None: sits out)."""
    device = next(model.parameters()).device
    positions = decode_positions(model, list(cache.requests), device)
    fed = torch.tensor([0 if token is None else token for token in tokens], dtype=torch.long, device=device)
    text = torch.zeros_like(fed)  # (the rows' slices of these tensors are views: one tensor each, not one per row)
    return [RowInput(fed[b : b + n], positions[..., b, :n], text[b : b + n])
            for b, n in enumerate(0 if token is None else 1 for token in tokens)]


@dataclass
class DecodeRow:
    """One row being decoded: how it samples, when it is done and why, what it generated.

    The one rule of "is this row done, and why" for every path (the pipeline's rows through `decode`,
    the server's rows through `serving/stepper.py`): "stop" at a stop token or once `done` says so,
    else "length" after `max_new_tokens`.
    """

    sampler: Sampler
    stop_ids: frozenset[int] = frozenset()
    done: Callable[[list[int]], bool] | None = None  # over the generated ids so far
    min_new_tokens: int = 0  # stop ids cannot be sampled before this many tokens
    generated: list[int] = field(default_factory=list)
    reason: str | None = None  # why the row is done: "stop" or "length" (None: not done)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def accept(self, logits: torch.Tensor, max_new_tokens: int) -> int:
        """Sample the next token from `[V]` logits, record it, decide whether the row is done."""
        token = self.sample(logits)
        self.record(token, max_new_tokens)
        return token

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from `[V]` logits (no stop token before `min_new_tokens`)."""
        if len(self.generated) < self.min_new_tokens and self.stop_ids:
            logits = logits.clone()
            logits[list(self.stop_ids)] = float("-inf")
        return self.sampler(logits)

    def stops_at(self, token: int) -> bool:
        """Whether `token` is one of the row's stop tokens (it ends the row; it is no text of the answer)."""
        return token in self.stop_ids

    def record(self, token: int, max_new_tokens: int) -> str | None:
        """Record a sampled token; returns why the row is done now ("stop" before "length"), None if not."""
        self.generated.append(token)
        if self.stops_at(token) or (self.done is not None and self.done(self.generated)):
            self.reason = "stop"
        elif len(self.generated) >= max_new_tokens:
            self.reason = "length"
        return self.reason


def decode(model, cache: DBTrimKVCache, logits: torch.Tensor, rows: list[DecodeRow], max_new_tokens: int,
           history: torch.Tensor | None = None, logits_processor=None, stopping_criteria=None,
           on_step: Callable[[list[int | None]], None] | None = None) -> None:
    """Decode from the prompt's last logits `[B, V]` until every row is done (`rows[b].generated`).

    The rows advance together (cache columns keep counting, as transformers' `generate` counts them).
    `logits_processor` and `stopping_criteria` (transformers' `(ids [B, n], scores [B, V])` callables; a
    criterion returns `[B]` bools, True ending that row) see `history` (`[B, n]`: the ids so far)
    followed by the generated ids. `on_step` gets each step's tokens (None: row done).
    """
    ids, criteria = history, list(stopping_criteria or [])
    while True:
        if logits_processor is not None:
            logits = logits_processor(ids, logits)
        step = [None if row.finished else row.accept(logits[b], max_new_tokens) for b, row in enumerate(rows)]
        if on_step is not None:
            on_step(step)
        if logits_processor is not None or criteria:
            fill = torch.tensor([[0 if t is None else t] for t in step], dtype=torch.long, device=ids.device)
            ids = torch.cat([ids, fill], 1)
            for criterion in criteria:
                for b, stop in enumerate(criterion(ids, logits).tolist()):
                    if stop and not rows[b].finished:
                        rows[b].reason = "stop"
        if all(row.finished for row in rows):
            return
        feed = [None if row.finished else row.generated[-1] for row in rows]
        logits = forward_rows(model, cache, decode_rows(model, cache, feed), width=1, keep_columns=True)
