"""Live video sessions: frames arrive over time, questions come at any moment, memory stays flat.

Why: a camera or a stream has no end, so it cannot be encoded first and asked later. A
`LiveSession` owns one bounded `DBTrimKVCache` holding the chat prefix and every frame group
seen so far (compressed by the eviction policy). `push(index, frame, fps)` adds a frame; each
`window_frames` frames are prefilled (vision tower included) and dropped. `ask(question)` forks
the cache as it is now (`cache.clone()`), appends the question and answers from the fork, so the
video is never re-encoded and the session keeps running; the answer carries the stream time of
the last frame it saw. Prefill and answers run on the model runner (`dbtrimkv.prefill` /
`generate`). Memory is the bounded cache, one fork per question being answered, and at
most one window of frames: the same after a minute or a day.

Frames are timed by `index / fps` (the processor writes these times into the prompt as
`<t seconds>`), so a file's frame numbers and a live source's clock readings both work.
`sources.stream_frames` opens files (optionally paced at real time), cameras and network streams.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import DBTrimKVCache
from ..settings.config import DBTrimKVConfig
from ..settings.eviction_settings import resolve_eviction
from ..generation import generate, model_lock, prefill
from ..pipeline import GenerationStats, collect_stats
from ..inputs.prompts import tokenizer_of
from .streaming import StreamOptions, frame_windows, prompt_parts, text_inputs


@dataclass
class LiveAnswer:
    question: str
    text: str
    stream_seconds: float  # time of the last frame in the cache the answer came from
    frames: int  # frames in that cache
    stats: GenerationStats


class LiveSession:
    """One live video: `push` frames as they come, `ask` at any time (thread-safe between the two)."""

    def __init__(self, model, processor, config: DBTrimKVConfig | None = None, options: StreamOptions | None = None,
                 max_new_tokens: int = 64):
        self.model, self.processor = model, processor
        self.options = options or StreamOptions(window_frames=processor.video_processor.temporal_patch_size)
        self.max_new_tokens = max_new_tokens
        self.prefix, _ = prompt_parts(processor, "")
        self.cache = DBTrimKVCache(model, config or resolve_eviction(model))
        self._state = threading.Lock()  # guards the cache and counters between push and ask
        self._pending: list[tuple[int, np.ndarray, float]] = []
        self.frames = 0
        self.stream_seconds = 0.0
        with model_lock(model), torch.no_grad():
            prefill(model, text_inputs(processor, self.prefix, first=True), self.cache)

    @property
    def window(self) -> int:
        """Frames per prefill: `window_frames` rounded up to whole frame groups."""
        temporal = self.processor.video_processor.temporal_patch_size
        return -(-self.options.window_frames // temporal) * temporal

    def push(self, index: int, frame: np.ndarray, fps: float) -> None:
        """Add one RGB uint8 frame (`index / fps` = its time in seconds); prefills every full window."""
        self._pending.append((index, frame, fps))
        if len(self._pending) >= self.window:
            self.flush()

    def feed(self, frames) -> None:
        """`push` every `(index, frame, fps)` of an iterator (e.g. `sources.stream_frames`)."""
        for index, frame, fps in frames:
            self.push(index, frame, fps)

    def flush(self) -> None:
        """Prefill the frames waiting for a full window (at the end of a source)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        fps = pending[0][2]
        for window in frame_windows(self.processor, pending, self.options):  # at most one window
            with model_lock(self.model), self._state, torch.no_grad():
                prefill(self.model, window.inputs, self.cache)
                self.frames += len(window.frames_indices)
                self.stream_seconds = window.frames_indices[-1] / fps if fps else 0.0

    def ask(self, question: str, max_new_tokens: int | None = None) -> LiveAnswer:
        """Answer from a fork of the cache as it is now; frames still waiting for a full window are
        not in it yet (at most `window_frames - 1`)."""
        prefix, suffix = prompt_parts(self.processor, question)
        if prefix != self.prefix:
            raise ValueError("the chat template puts question-dependent text before the video")
        with self._state:
            cache, seconds, frames = self.cache.clone(), self.stream_seconds, self.frames
            evictions = cache.num_evictions
        inputs = text_inputs(self.processor, suffix, first=False)
        timings: dict = {}
        with torch.no_grad():
            new = generate(self.model, inputs, cache, max_new_tokens=max_new_tokens or self.max_new_tokens,
                           timings=timings, do_sample=False, temperature=None, top_p=None, top_k=None)[0]
        text = tokenizer_of(self.processor).decode(new, skip_special_tokens=True)
        stats = collect_stats(cache, inputs, 0, new.numel(), timings, evictions)
        return LiveAnswer(question, text, seconds, frames, stats)

    def memory(self) -> dict[str, int]:
        """What the session holds now: KV entries, KV storage bytes, peak entries, frames waiting."""
        with self._state:
            return {"entries": self.cache.num_entries(), "kv_bytes": self.cache.storage_bytes(),
                    "peak_entries": self.cache.peak_entries[0] if self.cache.peak_entries else 0,
                    "pending_frames": len(self._pending)}
