"""The pending token: the last token a generation sampled, never fed to the model.

Why: decoding feeds token i to sample token i + 1, so a reply's last token is sampled but not cached;
a next turn must feed it first (before the template tokens that close the reply), or the cache
would miss a token a one-shot prompt of the whole conversation holds. This module is the one rule:
`reply_pending` names the pending ids of a reply (what the server's sessions feed first), and a cache
kept by a caller between `generate` calls remembers its conversation's ids (`record_generation`), so
`with_pending_tokens` puts the ids it has not processed in front of the next inputs.
"""

from __future__ import annotations

import torch

from ..cache import DBTrimKVCache
from .positions import with_input_defaults


def reply_pending(reply_ids: list[int]) -> list[int]:
    """The ids of a finished reply that were never fed to the model: its last one (none for no reply)."""
    return list(reply_ids[-1:])


def with_pending_tokens(cache: DBTrimKVCache, inputs, device) -> dict:
    """`inputs` on `device` with defaults filled in, preceded by the known tokens the cache has not processed."""
    inputs = with_input_defaults(inputs, device)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    if cache.pool is not None:
        known_ids, known_mask = cache.known_tokens(ids.shape[0], device)
        pending_ids, pending_mask = known_ids[:, cache.columns :], known_mask[:, cache.columns :]
        ids = torch.cat([pending_ids, ids], 1)
        mask = torch.cat([pending_mask, mask], 1)
        types = torch.cat([torch.zeros_like(pending_ids), types], 1)
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
    return out
