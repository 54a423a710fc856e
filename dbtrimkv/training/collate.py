"""Batches: order, right-padding, media concatenation, and packing of text-only sequences.

Why: the loss needs, per token, whether it is real, its position within its own sequence (for
`S_t`) and whether it predicts a response token; the model needs its usual inputs. A batch is a
dict of tensors (so `accelerate` moves it to the device):
`{"model_inputs": {...}, "loss_mask", "targets", "positions", "valid"}`, all `[B, T]`.

- Padded batches (any model): right padding with an `attention_mask`; images and videos of all
  examples are concatenated in order, as the processor would for a batch.
- Packing (text-only models): several short sequences share a row of up to `max_length` tokens.
  The model gets `position_ids` that restart at 0 for every sequence and no `attention_mask`, from
  which transformers builds a block-diagonal causal mask; the retention bias and `S_t` are also
  confined to each sequence. Row padding is its own pseudo-sequence (positions restart), marked
  not valid.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .data import MEDIA_KEYS

_SEQUENCE_KEYS = ("input_ids", "mm_token_type_ids", "loss_mask", "targets", "positions")


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate consecutive text-only examples into rows of at most `max_length` tokens."""
    rows, current = [], []
    for example in examples:
        if current and sum(len(e["input_ids"]) for e in current) + len(example["input_ids"]) > max_length:
            rows.append(current)
            current = []
        current.append(example)
    if current:
        rows.append(current)
    return [{k: torch.cat([e[k] for e in row]) for k in ("input_ids", "loss_mask", "targets", "positions")}
            for row in rows]


class Collator:
    """Callable for `DataLoader(collate_fn=...)`."""

    def __init__(self, pad_token_id: int, packed: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_token_id, "mm_token_type_ids": 0, "loss_mask": False, "targets": 0}
        columns = {}
        for key in _SEQUENCE_KEYS:
            if key not in examples[0]:
                continue
            rows = []
            for e in examples:
                pad = length - len(e[key])
                tail = torch.arange(pad) if key == "positions" else torch.full((pad,), fill[key], dtype=e[key].dtype)
                rows.append(torch.cat([e[key], tail.to(e[key].dtype)]))
            columns[key] = torch.stack(rows)
        valid = torch.stack([torch.arange(length) < len(e["input_ids"]) for e in examples])
        inputs = {"input_ids": columns["input_ids"]}
        if self.packed:
            inputs["position_ids"] = columns["positions"]
        else:
            inputs["attention_mask"] = valid.long()
        if "mm_token_type_ids" in columns:
            inputs["mm_token_type_ids"] = columns["mm_token_type_ids"]
        for key in MEDIA_KEYS:
            parts = [e[key] for e in examples if key in e]
            if parts:
                inputs[key] = torch.cat(parts)
        return {"model_inputs": inputs, "loss_mask": columns["loss_mask"], "targets": columns["targets"],
                "positions": columns["positions"], "valid": valid}


class EpochSampler(Sampler[int]):
    """A fresh permutation every epoch, a function of `(seed, epoch)` only, so resuming needs just the step."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
