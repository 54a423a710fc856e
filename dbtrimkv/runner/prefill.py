"""Chunked prefill with eviction over a (left-padded) batch of prompts, each row cut where it would be cut alone.

Why: `model(**inputs, cache=cache)` prefills the whole prompt in one forward, so its K/V must fit
before anything can be evicted. Here each prompt goes to the language model `chunk` of its tokens at
a time through the one forward (`forward.forward_rows`); the cache evicts before each chunk, so a
sequence never holds more than `budget + L*H*max(buffer_size, chunk)` entries. M-RoPE positions are
computed once for all new tokens and offset by where the cache's previous turns ended; images and
video frame groups are encoded only when a chunk reaches them (`vision.VisionStream`); a cache that
already holds earlier turns is continued (only the new tokens run). The rope delta each sequence
has after its prompt is recorded in its request-table row (`finish_prompt`), where decode steps
read it (`positions.decode_positions`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache import DBTrimKVCache
from ..modeling.rope_scaling import whole_prompt_rotary
from .forward import RowInput, forward_rows
from .positions import is_vision_language, rope_deltas, token_positions
from .vision import VisionStream


class PromptBatch:
    """New tokens of a batch of sequences, as one left-padded `[B, T]` batch: ids, mask, types, positions
    (from where each sequence stands) and the vision stream. A prompt of the pipeline's batch and a
    server request (one row) alike."""

    def __init__(self, model, inputs: dict, seen: list[int], mrope_start: list[int]):
        """`inputs`: processor outputs with defaults filled in (`positions.with_input_defaults`); sequence b
        has seen `seen[b]` tokens and its next token's M-RoPE position is `mrope_start[b]`."""
        self.model = model
        self.ids, self.mask, self.types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
        self.positions = token_positions(model, inputs, self.mask, seen, mrope_start)
        has_vision = is_vision_language(model) and bool(self.types.any())
        self.stream = VisionStream(model, inputs, self.types, self.mask) if has_vision else None

    @classmethod
    def after(cls, model, cache: DBTrimKVCache, inputs: dict) -> "PromptBatch":
        """The new tokens of every sequence of `cache`, continuing where each stands."""
        batch = inputs["input_ids"].shape[0]
        return cls(model, inputs, cache.seen or [0] * batch, cache.next_mrope_positions(batch))

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def rows(self, start: int, end: int) -> list[RowInput]:
        """Each sequence's real tokens in columns [start, end) (left padding comes first, so a row's
        tokens are the chunk's right-most columns) with their positions and visual features."""
        return self.rows_in([(start, end)] * self.ids.shape[0])

    def rows_in(self, spans: list[tuple[int, int]]) -> list[RowInput]:
        """Row b's real tokens in its own columns `spans[b]` = [start, end), with positions and visual features."""
        table = self.model.get_input_embeddings().weight
        vision = (self.stream.chunks(spans, table.device, table.dtype) if self.stream is not None
                  else [None] * self.ids.shape[0])
        out = []
        for b, (start, end) in enumerate(spans):
            real = self.mask[b, start:end].bool()
            out.append(RowInput(self.ids[b, start:end][real], self.positions[..., b, start:end][..., real],
                                self.types[b, start:end][real], vision[b]))
        return out

    def run(self, cache: DBTrimKVCache, start: int, end: int, chunk: int,
            report: Callable[[int], None] = lambda done: None):
        """Feed columns [start, end) to `cache` (its rows = this batch's); returns each row's logits after
        its last token in the range `[B, V]` (None if nothing ran). The rotary table covers the whole
        prompt's positions.

        Each row is cut into chunks of `chunk` of its own real tokens, counted from its first one, so a
        left-padded row is cut (and evicted before each chunk) exactly where it would be alone, and a
        batch answers as its prompts do one by one. The forwards' widths add up to `end - start`
        columns (the last one is padded), so `get_seq_length()` counts the columns as transformers expects."""
        real = [torch.nonzero(self.mask[b, start:end]).flatten().add(start).tolist() for b in range(self.ids.shape[0])]
        steps = max((-(-len(cols) // chunk) for cols in real), default=0) or int(end > start)
        logits, done = None, 0
        with whole_prompt_rotary(self.model, int(self.positions.max()) if self.positions.numel() else 0):
            for k in range(steps):
                picked = [cols[k * chunk : (k + 1) * chunk] for cols in real]
                width = max(len(cols) for cols in picked) if k + 1 < steps else end - start - done
                spans = [(cols[0], cols[-1] + 1) if cols else (0, 0) for cols in picked]  # (0, 0): sits it out
                out = forward_rows(self.model, cache, self.rows_in(spans), width=width, keep_columns=True)
                # a row's logits are those after its last token (a row with none in the range: the last forward's)
                ended = [(bool(cols) and cols[-1] == whole[-1]) or (not whole and k + 1 == steps)
                         for cols, whole in zip(picked, real)]
                logits = out if logits is None else torch.where(torch.tensor(ended, device=out.device)[:, None], out, logits)
                done += width
                report(start + done)
        return logits

    def finish(self, cache: DBTrimKVCache, upto: int, rows: list[int] | None = None) -> None:
        """After columns [0, upto) were fed: record each sequence's rope delta in its cache row (`rows[b]`
        for sequence b; default: row b)."""
        rows = list(range(self.ids.shape[0])) if rows is None else rows
        finish_prompt(self.model, cache, self.positions[..., :upto], self.mask[:, :upto], rows)


def finish_prompt(model, cache: DBTrimKVCache, positions: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
    """Record how far M-RoPE runs ahead of the text position in cache rows `rows` once the prompt tokens
    with `positions` `[4, len(rows), T]` and `mask` `[len(rows), T]` were fed (constant while decoding text), so later tokens
    and turns continue at `seen + rope_delta`. Nothing for a text-only model."""
    if not is_vision_language(model) or positions.shape[-1] == 0:
        return
    seen = [cache.requests[b].seen for b in rows]
    for b, delta in zip(rows, rope_deltas(positions, mask, seen)):
        if delta is not None:
            cache.set_rope_delta(b, delta)


def progress_reporter(progress, total: int, chunk: int) -> Callable[[int], None]:
    """`progress`: a callable (done, total), True for a bar when the prompt is longer than a chunk, or False."""
    if callable(progress):
        return lambda done: progress(done, total)
    if progress and total > chunk:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", desc="prefill", leave=False)
        return lambda done: (bar.update(done - bar.n), bar.close() if done >= total else None)
    return lambda done: None
