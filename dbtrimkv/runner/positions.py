"""Input defaults, token positions (text and Qwen-VL M-RoPE), rope deltas and decode positions.

Why: every path that runs the model (one chat, a video stream, the server's batches) must give each
token the position the model would give it in one forward over the whole conversation. These are
the one definitions; the model runner (`runner.py`) and the server's steps call them. Positions are
always passed explicitly, so nothing is read from (or written to) transformers' `model.model.rope_deltas`:
a sequence's rope delta lives in its request-table row (`cache.set_rope_delta`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def language_model_of(model):
    """The text decoder that takes `inputs_embeds` (Qwen3-VL: `model.model.language_model`)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    if inner is not None:
        return inner
    raise ConfigError(f"unsupported model {type(model).__name__}: no inner decoder found")


def is_vision_language(model) -> bool:
    return hasattr(getattr(model, "model", None), "visual")


def with_input_defaults(inputs, device) -> dict:
    """`inputs` with `input_ids`, `attention_mask` (default: no padding) and `mm_token_type_ids` (default:
    all text) on `device`: the one place these defaults are written."""
    ids = inputs["input_ids"].to(device)
    mask, types = inputs.get("attention_mask"), inputs.get("mm_token_type_ids")
    return dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask.to(device),
                mm_token_type_ids=torch.zeros_like(ids) if types is None else types.to(device))


def check_token_ids(model, ids: torch.Tensor) -> None:
    """ConfigError for ids that are not integers or lie outside the model's vocabulary (an index error deep
    inside the embedding otherwise)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must be an integer tensor, got {ids.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(f"input_ids must lie in [0, {vocab - 1}] (the model's vocabulary), got values from "
                          f"{int(ids.min())} to {int(ids.max())}")


def token_positions(model, inputs, mask: torch.Tensor, seen: list[int], mrope_start: list[int]) -> torch.Tensor:
    """Positions of new tokens that follow `seen[b]` real tokens whose M-RoPE ran to `mrope_start[b] - 1`:
    `[4, B, T]` (text + M-RoPE) for Qwen3-VL, else `[B, T]`; 0 for padding."""
    seen = torch.tensor(seen, device=mask.device)[:, None]
    text = torch.where(mask.bool(), seen + torch.cumsum(mask.long(), 1) - 1, torch.zeros_like(mask.long()))
    if not is_vision_language(model):
        return text
    ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    mrope, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask,
    )
    offset = torch.tensor(mrope_start, device=mask.device)[None, :, None]
    mrope = torch.where(mask.bool()[None], mrope + offset, torch.zeros_like(mrope))
    return torch.cat([text[None], mrope], 0)


def rope_deltas(positions: torch.Tensor, mask: torch.Tensor, seen: list[int]) -> list[int | None]:
    """How far each sequence's M-RoPE runs ahead of its text position once prompt tokens with
    `positions` `[4, B, T]` (row 0 text) and `mask` `[B, T]` were fed and sequence b has seen `seen[b]`
    tokens: the next token's M-RoPE position minus its text position, constant while decoding text.
    None for a row that fed no real token."""
    mrope = positions[1:].masked_fill(~mask.bool()[None], -1)
    last = mrope.amax(dim=(0, 2)).tolist()
    return [int(value) + 1 - n if value >= 0 else None for value, n in zip(last, seen)]


def decode_positions(model, rows: list, device) -> torch.Tensor:
    """Positions of one next token per sequence (request-table rows: `seen`, `rope_delta`): `[B, 1]`
    text positions, or `[4, B, 1]` for a vision-language model (text; M-RoPE t, h, w = seen + rope delta).
    The one place decode positions are computed."""
    text = torch.tensor([row.seen for row in rows], dtype=torch.long, device=device)[:, None]
    if not is_vision_language(model):
        return text
    mrope = torch.tensor([row.seen + row.rope_delta for row in rows], dtype=torch.long, device=device)
    return torch.cat([text[None], mrope[None, :, None].expand(3, -1, 1)], 0)
