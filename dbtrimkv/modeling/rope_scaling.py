"""LongRoPE (Phi-3-mini-128k): one choice of rotary factors for a whole prompt, however it is chunked.

Why: transformers' LongRoPE picks the short or the long rotary factors per forward, from the largest
position in that forward (`seq_len > original_max_position_embeddings`). A prompt longer than
`original_max_position_embeddings` (4096 for Phi-3-mini-128k) prefilled in one forward gets the long
factors for all its tokens; prefilled in chunks, the early chunks would get the short ones and
their keys would be rotated differently, so chunked prefill would not compute what one forward
computes. `whole_prompt_rotary(model, last_position)` makes every forward inside it use the
factors the whole prompt selects (decoding afterwards keeps transformers' per-forward rule, as a
full-cache model does). Models without LongRoPE are untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _longrope_modules(model) -> list:
    return [m for m in model.modules()
            if getattr(m, "rope_type", None) == "longrope" and isinstance(getattr(m, "original_inv_freq", None),
                                                                           torch.Tensor)]


def _long_inv_freq(rotary, original_max: int) -> torch.Tensor:
    long = getattr(rotary, "long_inv_freq", None)
    if long is None:
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, rotary.original_inv_freq.device,
                                                  seq_len=original_max + 1)
    return long.to(rotary.original_inv_freq.device)


@contextmanager
def whole_prompt_rotary(model, last_position: int):
    """Inside: every forward uses the LongRoPE factors a single forward up to `last_position` would."""
    rotaries = _longrope_modules(model)
    chosen = []
    for rotary in rotaries:
        original_max = rotary.config.rope_parameters["original_max_position_embeddings"]
        if last_position + 1 > original_max:  # the whole prompt selects the long factors
            short = rotary.original_inv_freq.clone()
            rotary.original_inv_freq.copy_(_long_inv_freq(rotary, original_max))
            chosen.append((rotary, short))
    try:
        yield
    finally:
        for rotary, short in chosen:
            rotary.original_inv_freq.copy_(short)
