"""The pending token: the last token a generation sampled, never fed to the model.

Why: decoding feeds token i to sample token i + 1, so a reply's last token is sampled but not cached;
a next turn must feed it first (before the template tokens that close the reply), or the cache
would miss a token a one-shot prompt of the whole conversation holds. This module is the one rule,
and the sequence's own row of the request table (`SequenceState.pending`) is the one place it is
kept: `keep_pending` stores a finished reply's pending ids there (after `generate`, in
`record_generation`; the server, when it parks a session's row), the row carries them wherever it
goes (parked, saved to a file, into another batch), and the next input starts with them
(`with_pending_tokens` for `generate`; the server's next turn reads `pending_ids`).
"""

from __future__ import annotations

import torch

from ..cache import DBTrimKVCache
from ..cache.requests import SequenceState
from .positions import with_input_defaults


def keep_pending(state: SequenceState, reply_ids: list[int]) -> None:
    """A sequence finished a reply with `reply_ids`: the ones never fed (its last one; none for no reply)
    are its next input's first ids."""
    state.pending = tuple(int(i) for i in reply_ids[-1:])


def pending_ids(state: SequenceState) -> list[int]:
    """The ids a sequence's next input starts with."""
    return list(state.pending)


def pending_rows(cache: DBTrimKVCache, batch: int) -> list[SequenceState]:
    """The request-table rows whose pending ids go before a `batch`-row input (none: a cache that holds no
    sequences yet, or one of another batch size)."""
    return list(cache.requests) if cache.has_pool and len(cache.requests) == batch else []


def with_pending_tokens(cache: DBTrimKVCache, inputs, device) -> dict:
    """`inputs` on `device` with defaults filled in, each row preceded by its sequence's pending ids
    (which the rows hand over: they are fed now)."""
    inputs = with_input_defaults(inputs, device)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    rows = pending_rows(cache, ids.shape[0])
    width = max((len(row.pending) for row in rows), default=0)
    if width:
        pending = torch.zeros(ids.shape[0], width, dtype=ids.dtype, device=device)
        pending_mask = torch.zeros(ids.shape[0], width, dtype=mask.dtype, device=device)
        for b, row in enumerate(rows):
            if row.pending:
                pending[b, width - len(row.pending) :] = torch.tensor(row.pending, dtype=ids.dtype)
                pending_mask[b, width - len(row.pending) :] = 1
            row.pending = ()
        ids, mask = torch.cat([pending, ids], 1), torch.cat([pending_mask, mask], 1)
        types = torch.cat([torch.zeros_like(pending), types], 1)
    return dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=types)


def record_generation(cache: DBTrimKVCache, ids: torch.Tensor, mask: torch.Tensor, generated: list[list[int]],
                      pad: int) -> torch.Tensor:
    """Remember the conversation's ids after a generation: `ids`/`mask` `[B, columns before decoding]`,
    then each row's generated tokens as fed (a row that finished early sat the later steps out: padding),
    its last token in the final column (pending). Returns the generated ids `[B, N]`, padded with `pad`."""
    steps = max(len(g) for g in generated)
    fed = torch.zeros(len(generated), steps, dtype=ids.dtype, device=ids.device)
    fed_mask = torch.zeros(len(generated), steps, dtype=mask.dtype, device=ids.device)
    out = torch.full((len(generated), steps), pad, dtype=ids.dtype, device=ids.device)
    for b, tokens in enumerate(generated):
        out[b, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        fed[b, : len(tokens) - 1] = out[b, : len(tokens) - 1]
        fed_mask[b, : len(tokens) - 1] = 1
        fed[b, -1], fed_mask[b, -1] = tokens[-1], 1
    cache.record_tokens(torch.cat([ids, fed], 1), torch.cat([mask, fed_mask], 1))
    for state, tokens in zip(cache.requests, generated):
        keep_pending(state, tokens)
    return out
