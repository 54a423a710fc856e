"""`TokenMemory`: the token ids of a conversation so far, processed or still pending.

Why: id-based logits processors want every earlier id, a retention timeline labels what the cache
kept, and a saved cache keeps its conversation's text. (Which ids are still to be fed is the
sequence's own row, `SequenceState.pending`: `runner/pending.py`.) The memory keeps `[B, columns]`
ids and mask beside the cache, row for row
(a row added to a live cache gets all-padding history; a parked row's history leaves with it).
"""

from __future__ import annotations

import torch


class TokenMemory:
    def __init__(self):
        self.ids: torch.Tensor | None = None  # [B, columns] ids known to the generation helper
        self.mask: torch.Tensor | None = None

    def record(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def add_row(self) -> None:
        """Every column processed so far is padding for a new last row."""
        if self.ids is not None:
            self.ids = torch.cat([self.ids, self.ids.new_zeros(1, self.ids.shape[1])])
            self.mask = torch.cat([self.mask, self.mask.new_zeros(1, self.mask.shape[1])])

    def remove_row(self, row: int) -> None:
        if self.ids is not None:
            keep = [b for b in range(self.ids.shape[0]) if b != row]
            self.ids, self.mask = self.ids[keep], self.mask[keep]

    def known(self, batch: int, columns: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the conversation so far; of the `columns` processed, those fed by plain
        `model(...)` calls are unknown and filled with id 0 (they only matter to id-based logits
        processors)."""
        ids = self.ids if self.ids is not None else torch.zeros(batch, 0, dtype=torch.long)
        mask = self.mask if self.mask is not None else torch.zeros(batch, 0, dtype=torch.long)
        ids, mask = ids.to(device), mask.to(device)
        if ids.shape[1] < columns:
            fill = columns - ids.shape[1]
            ids = torch.cat([torch.zeros(batch, fill, dtype=ids.dtype, device=device), ids], 1)
            mask = torch.cat([torch.ones(batch, fill, dtype=mask.dtype, device=device), mask], 1)
        return ids, mask

    def clone(self) -> "TokenMemory":
        other = TokenMemory()
        other.ids, other.mask = self.ids, self.mask  # never written in place: sharing is a copy
        return other
