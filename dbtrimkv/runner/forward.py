"""One forward of the language model over a ragged batch of rows sharing one cache.

Why: every forward dbtrimkv runs is this one: a prefill chunk of one prompt, a chunk of each prompt
of a left-padded batch, or a continuous-batching step that mixes rows prefilling their next chunk
(with the images or video frames it reaches) and rows decoding one token. Each row is left-padded
to the widest; padding is never cached and every real token carries its own logical and M-RoPE
position, so a row computes what it would compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import DBTrimKVCache
from ..modeling.transformers_compat import cache_kwargs
from .positions import is_vision_language, language_model_of
from .vision import VisionChunk, vision_inputs


@dataclass
class RowInput:
    """What one row feeds in this forward (nothing: an empty `ids`, the row sits the forward out)."""

    ids: torch.Tensor  # [n] token ids
    positions: torch.Tensor  # [n] text positions, or [4, n] with M-RoPE (Qwen3-VL)
    types: torch.Tensor  # [n] modality codes (0 text, 1 image, 2 video)
    vision: VisionChunk | None = None  # the chunk's visual features, if it has any


@torch.no_grad()
def forward_rows(model, cache: DBTrimKVCache, rows: list[RowInput], width: int | None = None,
                 keep_columns: bool = False) -> torch.Tensor:
    """Run the rows (row b of the cache = rows[b]), each left-padded to `width` columns (default: the
    longest row); returns the next-token logits of each row's last column `[B, V]`.

    `keep_columns`: the cache's column count goes on (a batch whose rows advance together, so
    `get_seq_length()` stays the number of columns processed, as transformers' `generate` expects);
    otherwise it is cleared first (a serving batch, whose rows share no column count)."""
    device = next(model.parameters()).device
    counts = [r.ids.numel() for r in rows]
    width = max(counts) if width is None else width
    ids, mask, types, positions = pack_rows(rows, counts, width, is_vision_language(model), device)
    embeds, kwargs = vision_inputs([r.vision for r in rows], counts, width, model.get_input_embeddings()(ids))
    if not keep_columns:
        cache.clear_columns()
    history = torch.ones(len(rows), cache.get_seq_length(), dtype=mask.dtype, device=device)
    cache.set_next_modality(types)
    out = language_model_of(model)(inputs_embeds=embeds, attention_mask=torch.cat([history, mask], 1),
                                   position_ids=positions, use_cache=True, **cache_kwargs(cache), **kwargs)
    return model.get_output_embeddings()(out.last_hidden_state[:, -1])


def pack_rows(rows: list[RowInput], counts: list[int], width: int, vision_language: bool, device):
    """The rows as one batch: `ids`, `mask`, `types` `[B, width]` and `positions` (`[4, B, width]` with
    M-RoPE, else `[B, width]`), each row left-padded to `width` (`counts[b]` real tokens; long tensors,
    zeros in the padding). When no row needs padding (a decode step: one token each) the rows are
    stacked in one call per tensor; otherwise `pad_rows` writes them row by row (the reference)."""
    if not counts or any(n != width for n in counts):
        return pad_rows(rows, counts, width, vision_language, device)

    def stack(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return torch.stack(parts, dim).to(device, torch.long)

    ids = stack([r.ids for r in rows])
    return ids, torch.ones_like(ids), stack([r.types for r in rows]), stack([r.positions for r in rows], -2)


def pad_rows(rows: list[RowInput], counts: list[int], width: int, vision_language: bool, device):
    """`pack_rows` one row at a time: each row's tokens at the right end of zeros."""
    batch = len(rows)
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    types = torch.zeros(batch, width, dtype=torch.long, device=device)
    positions = torch.zeros((4, batch, width) if vision_language else (batch, width), dtype=torch.long, device=device)
    for b, (row, n) in enumerate(zip(rows, counts)):
        if n:
            ids[b, width - n :] = row.ids
            mask[b, width - n :] = 1
            types[b, width - n :] = row.types
            positions[..., b, width - n :] = row.positions
    return ids, mask, types, positions
