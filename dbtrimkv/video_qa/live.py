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

Bad input is one clear `DBTrimKVError` naming the argument: a text-only model (`ConfigError`, as
`VideoQA`), `options` that are not a `StreamOptions`, a `max_new_tokens` below 1, an `index` that is
not a non-negative integer or goes back in time, an `fps` that is not a finite number > 0 or changes
within the session (`ConfigError`), a `frame` that is not an image (`MediaError`), and `ask` before
any frame is in the cache (`MediaError`: an answer over no video would be invented). A `frame` may be
an HxWx3 RGB uint8 array, HxW / HxWx1 grayscale, HxWx4 RGBA (alpha dropped) or a PIL image in any
mode; other dtypes are read as `inputs.images.load_image` reads image arrays (floats in [0, 1] are
scaled by 255, floats up to 255 taken as they are, bools are black and white).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..cache import DBTrimKVCache
from ..errors import ConfigError, MediaError
from ..inputs.images import check_image_size, load_image
from ..settings.config import DBTrimKVConfig
from ..settings.eviction_settings import resolve_eviction
from ..generation import generate, model_lock, prefill
from ..pipeline import GenerationStats, collect_stats
from ..inputs.prompts import tokenizer_of
from ..runner.sampling import integer_value, real_value
from .streaming import StreamOptions, check_options, check_takes_video, frame_windows, prompt_parts, text_inputs


def _check_max_new_tokens(value) -> int:
    whole = integer_value(value)
    if whole is None or whole < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {value!r}")
    return whole


def _check_index(index) -> int:
    whole = integer_value(index)
    if whole is None or whole < 0:
        raise ConfigError(f"index must be a non-negative integer (the frame's number; index / fps is its time), "
                          f"got {index!r}")
    return whole


def _check_fps(fps) -> float:
    number = real_value(fps)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"fps must be a finite number > 0 (index / fps is the frame's time in seconds), got {fps!r}")
    return float(number)


def as_frame(frame) -> np.ndarray:
    """An RGB uint8 HxWx3 array from what `push` accepts as `frame`; MediaError naming `frame` otherwise."""
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3:
        check_image_size(frame.shape[1], frame.shape[0], what="frame")
        return frame
    if not isinstance(frame, (np.ndarray, Image.Image)):
        raise MediaError(f"frame must be an HxWx3 RGB array (HxW grayscale and HxWx4 RGBA work too) or a PIL image, "
                         f"got {type(frame).__name__}")
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[0] in (1, 3, 4) \
            and frame.shape[-1] not in (1, 3, 4):
        raise MediaError(f"frame has shape {tuple(frame.shape)}, channels first: give HxWxC "
                         f"(e.g. frame.transpose(1, 2, 0))")
    try:
        image = load_image(frame)
    except MediaError as exc:
        raise MediaError(f"frame: {exc}") from None
    return np.asarray(image)


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
        check_takes_video(processor)
        self.model, self.processor = model, processor
        self.options = StreamOptions(window_frames=processor.video_processor.temporal_patch_size) \
            if options is None else check_options(options)
        self.max_new_tokens = _check_max_new_tokens(max_new_tokens)
        self.prefix, _ = prompt_parts(processor, "")
        self.cache = DBTrimKVCache(model, config or resolve_eviction(model))
        self._state = threading.Lock()  # guards the cache and counters between push and ask
        self._pending: list[tuple[int, np.ndarray, float]] = []
        self._last: tuple[int, float] | None = None  # (index, fps) of the last frame pushed
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
        """Add one frame (`index / fps` = its time in seconds); prefills every full window.

        `index`: a non-negative integer, never below the previous frame's. `fps`: a finite number > 0,
        the same for every frame of the session. `frame`: an HxWx3 RGB uint8 array, or anything
        `as_frame` turns into one (grayscale, RGBA, a PIL image). ConfigError / MediaError otherwise."""
        index, fps, frame = _check_index(index), _check_fps(fps), as_frame(frame)
        if self._last is not None:
            last_index, last_fps = self._last
            if not math.isclose(fps, last_fps, rel_tol=1e-6):  # float32 and float64 readings of one rate agree
                raise ConfigError(f"fps must stay the same within a session (index / fps is each frame's time): "
                                  f"the first frames had fps {last_fps:g}, this one {fps:g}")
            fps = last_fps
            if index < last_index:
                raise ConfigError(f"index must not decrease (frames come in time order): "
                                  f"got {index} after {last_index}")
        self._last = (index, fps)
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
                self.stream_seconds = window.frames_indices[-1] / fps

    def ask(self, question: str, max_new_tokens: int | None = None) -> LiveAnswer:
        """Answer from a fork of the cache as it is now; frames still waiting for a full window are
        not in it yet (at most `window_frames - 1`). MediaError while no frame is in the cache: an
        answer then would be about no video at all."""
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else _check_max_new_tokens(max_new_tokens)
        prefix, suffix = prompt_parts(self.processor, question)
        if prefix != self.prefix:
            raise ConfigError("the chat template puts question-dependent text before the video")
        with self._state:
            if self.frames == 0:
                waiting = len(self._pending)
                if waiting:
                    raise MediaError(f"no frame is in the session yet: the {waiting} frame(s) pushed wait for a full "
                                     f"window of {self.window}; push more frames (or flush() at the end of the source) "
                                     f"before ask()")
                raise MediaError("no frame has been pushed yet: push(index, frame, fps) frames before ask()")
            cache, seconds, frames = self.cache.clone(), self.stream_seconds, self.frames
            evictions = cache.num_evictions
        inputs = text_inputs(self.processor, suffix, first=False)
        timings: dict = {}
        with torch.no_grad():
            new = generate(self.model, inputs, cache, max_new_tokens=max_new_tokens,
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
