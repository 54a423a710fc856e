"""The one modality enum: which kind of input a token came from.

Why: the cache records each entry's modality (to report what the budget kept), the generation
helper matches image / video placeholder tokens to their pixel inputs, and prompts count tokens by
kind. They all share these codes (stored as int8 in the slot pool), in this order, so a code
written by one module means the same thing to every other.
"""

from __future__ import annotations

from enum import IntEnum


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
