"""The one modality enum: which kind of input a token came from.

Why: the cache records each entry's modality (to report what the budget kept), the generation
helper matches image / video placeholder tokens to their pixel inputs, and prompts count tokens by
kind. They all share these codes (stored as int8 in the slot pool), in this order, so a code
written by one module means the same thing to every other.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2

    @property
    def label(self) -> str:
        """Lower-case name used in chats, reports and statistics: `text`, `image`, `video`."""
        return self.name.lower()


MODALITY_NAMES: tuple[str, ...] = tuple(m.label for m in Modality)  # ("text", "image", "video")
VISUAL_MODALITIES: tuple[Modality, ...] = (Modality.IMAGE, Modality.VIDEO)


def modality_codes(input_ids: torch.Tensor, image_token_id: int | None, video_token_id: int | None) -> torch.Tensor:
    """int8 `Modality` codes of `input_ids`: the image / video placeholder ids (None: that kind is
    text here) are image / video tokens, every other id is text."""
    codes = torch.zeros_like(input_ids, dtype=torch.int8)
    if image_token_id is not None:
        codes[input_ids == image_token_id] = Modality.IMAGE
    if video_token_id is not None:
        codes[input_ids == video_token_id] = Modality.VIDEO
    return codes
