"""One forward of the language model over a ragged batch of requests sharing one cache.

Why: continuous batching mixes, in one forward, requests at different stages: some prefill their
next prompt chunk (with the images or video frames that chunk reaches), some feed their last
prompt token, some decode one token. Each row is left-padded to the longest; padding is never
cached and every real token carries its own logical and M-RoPE position, so a row computes what
it would compute alone (`dbtrimkv.generation.prefill` is the one-request version of this).

A row's images are encoded by `encode_vision` before the batched forward, one row at a time, so
that the engine can fail the one request whose image breaks the vision tower and run the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import DBTrimKVCache
from ..generation import VisionStream, is_vision_language, language_model_of
from ..transformers_compat import cache_kwargs


@dataclass
class RowInput:
    """What one row feeds in this forward."""

    ids: torch.Tensor  # [n] token ids
    positions: torch.Tensor  # [n] text positions, or [4, n] with M-RoPE (Qwen3-VL)
    types: torch.Tensor  # [n] modality codes (0 text, 1 image, 2 video)
    vision: "VisionChunk | None" = None  # the chunk's visual features (`encode_vision`), if it has any


@dataclass
class VisionChunk:
    """The visual tokens of one row's chunk: which of its columns they fill, their embeddings, deepstack."""

    mask: torch.Tensor  # [n] bool
    embeds: torch.Tensor  # [visual tokens, hidden]
    deepstack: list[torch.Tensor]


def encode_vision(model, stream: VisionStream, start: int, end: int) -> VisionChunk | None:
    """Encode the images / video frames that prompt columns [start, end) of one request reach."""
    table = model.get_input_embeddings()
    mask, embeds, deep = stream.chunk_features(start, end, 1, table.embedding_dim, table.weight.device,
                                               table.weight.dtype)
    return None if mask is None else VisionChunk(mask[0], embeds, deep)


@torch.no_grad()
def forward_rows(model, cache: DBTrimKVCache, rows: list[RowInput]) -> torch.Tensor:
    """Run the rows (row b of the cache = rows[b]) and return the logits of each row's last token `[B, V]`."""
    device = next(model.parameters()).device
    batch, width = len(rows), max(r.ids.numel() for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    types = torch.zeros(batch, width, dtype=torch.long, device=device)
    vl = is_vision_language(model)
    positions = torch.zeros((4, batch, width) if vl else (batch, width), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        n = row.ids.numel()
        ids[b, width - n :] = row.ids
        mask[b, width - n :] = 1
        types[b, width - n :] = row.types
        positions[..., b, width - n :] = row.positions
    embeds = model.get_input_embeddings()(ids)
    kwargs = _vision_kwargs(rows, width, embeds) if vl else {}
    if kwargs:
        embeds = embeds.masked_scatter(kwargs["visual_pos_masks"][..., None], kwargs.pop("_embeds"))
    cache.clear_columns()  # rows of a serving cache share no column count; positions are explicit
    cache.set_next_modality(types)
    out = language_model_of(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   use_cache=True, **cache_kwargs(cache), **kwargs)
    return model.get_output_embeddings()(out.last_hidden_state[:, -1])


def _vision_kwargs(rows: list[RowInput], width: int, embeds: torch.Tensor) -> dict:
    """Visual mask, embeddings (row-major) and deepstack features of the rows whose chunk holds vision tokens."""
    vmask = torch.zeros(len(rows), width, dtype=torch.bool, device=embeds.device)
    pieces, deep = [], []
    for b, row in enumerate(rows):
        if row.vision is None:
            continue
        vmask[b, width - row.ids.numel() :] = row.vision.mask
        pieces.append(row.vision.embeds)
        deep.append(row.vision.deepstack)
    if not pieces:
        return {}
    deepstack = [torch.cat([d[k] for d in deep]) for k in range(len(deep[0]))]
    return {"visual_pos_masks": vmask, "deepstack_visual_embeds": deepstack, "_embeds": torch.cat(pieces)}
