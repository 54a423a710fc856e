"""Stream a video of any length into one bounded `DBTrimKVCache`, then answer questions from copies.

Why: a long video cannot be turned into one processor call (every frame and every pixel value
would be in memory at once) nor into one forward (its K/V would have to fit before anything is
evicted). Qwen3-VL treats each temporal frame group as its own grid with M-RoPE positions that
advance group by group, so the prompt can be built piece by piece and fed through
`dbtrimkv.prefill` (the model runner, `dbtrimkv.runner`) into one cache; answers decode through
`dbtrimkv.generate` on a fork of it:

    chat prefix tokens | window 1 of frames | window 2 | ... | question suffix tokens

Each window is decoded (PyAV), run through the processor with its absolute `frames_indices`
(so the `<t seconds>` stamps are those of the whole video), prefilled with eviction, and dropped.
KV memory therefore stays at `budget + L*H*max(buffer_size, prefill_chunk)` entries, and the host
holds one window of frames, whatever the video's length.

Fixed frame size: the Qwen3-VL video processor picks the frame resolution from the number of
frames it is given, so windows of different lengths would get different resolutions (and the
result would differ from processing the whole video). We fix the per-frame size up front from
the first frame (aspect ratio kept, sides multiples of patch x merge size, at most
`frame_tokens` merged vision tokens per frame group), resize every frame to it ourselves
(bicubic), and call the processor with `do_resize=False`.

Several questions about one video: the compressed video cache is encoded once and forked with
`DBTrimKVCache.clone()` per question, so the vision tower and the prefill run once per video.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

from ..cache import DBTrimKVCache
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError, PromptError
from ..settings.eviction_settings import resolve_eviction
from ..generation import generate, model_lock, prefill
from ..inputs.media import Video, check_image_size, iter_video_frames, video_info
from ..inputs.modality import MODALITY_NAMES
from ..pipeline import GenerationStats, collect_stats
from ..inputs.prompts import escape_special_tokens, is_multimodal, tokenizer_of, tokens_by_modality
from ..modeling.transformers_compat import video_placeholder

# qwen-vl-utils gives every frame of a long video its per-frame floor of 128 merged tokens
# (VIDEO_MIN_TOKEN_NUM); a stream has no known length, so that floor is our default.
DEFAULT_FRAME_TOKENS = 128


MAX_WINDOW_FRAMES = 4096  # decoded frames held at once
MAX_FRAME_TOKENS = 16384


@dataclass
class StreamOptions:
    """How a video is sampled and cut into windows.

    `fps`: frames sampled per second of video (0: every frame). `max_frames`: stop after this many
    sampled frames (None: the whole video). `window_frames`: sampled frames per processor call and
    prefill (rounded up to a multiple of the temporal patch size). `frame_tokens`: at most this
    many merged vision tokens per frame group, which fixes the per-frame resolution.
    """

    fps: float = 2.0
    max_frames: int | None = None
    window_frames: int = 32
    frame_tokens: int = DEFAULT_FRAME_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not math.isfinite(self.fps) \
                or self.fps < 0:
            raise ConfigError(f"fps must be a finite number >= 0 (0 keeps every frame), got {self.fps}")
        if self.max_frames is not None and (isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int)
                                            or self.max_frames < 1):
            raise ConfigError(f"max_frames must be at least 1, got {self.max_frames}")
        for name, high in (("window_frames", MAX_WINDOW_FRAMES), ("frame_tokens", MAX_FRAME_TOKENS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ConfigError(f"{name} must be at least 1 and at most {high}, got {value}")


def check_options(options) -> StreamOptions:
    """`options` itself, or the defaults for None; ConfigError for anything but a `StreamOptions`."""
    if options is None:
        return StreamOptions()
    if not isinstance(options, StreamOptions):
        raise ConfigError(f"options must be a StreamOptions (or None for the defaults), got {type(options).__name__}; "
                          f"e.g. StreamOptions(fps=1)")
    return options


def frame_size(processor, height: int, width: int, frame_tokens: int = DEFAULT_FRAME_TOKENS) -> tuple[int, int]:
    """(height, width) every frame is resized to: aspect ratio kept, sides multiples of
    patch_size x merge_size, at most `frame_tokens` merged tokens per frame (Qwen's own rounding)."""
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    return smart_resize(1, height, width, temporal_factor=1, factor=factor, min_pixels=factor * factor,
                        max_pixels=frame_tokens * factor * factor)


@dataclass
class Window:
    """Processor outputs for consecutive sampled frames of one video, and which source frames they are."""

    inputs: dict
    frames_indices: list[int]


def video_windows(processor, path: str | Path, options: StreamOptions | None = None) -> Iterator[Window]:
    """Decode `path` lazily and yield one `Window` per `window_frames` sampled frames."""
    options = check_options(options)
    frames = iter_video_frames(path, fps=options.fps, max_frames=options.max_frames)
    return frame_windows(processor, frames, options, total=video_info(path)[1])


def frame_windows(processor, frames: Iterable[tuple[int, np.ndarray, float]], options: StreamOptions | None = None,
                  total: int = 0) -> Iterator[Window]:
    """One `Window` per `window_frames` of `frames`, an iterator of `(source frame index, RGB uint8
    frame, source fps)` as `media.iter_video_frames` yields (a file, a generator, a live stream);
    the index over the fps is the frame's time. Frames are consumed lazily, one window at a time."""
    options = options or StreamOptions()
    temporal = processor.video_processor.temporal_patch_size
    window = math.ceil(options.window_frames / temporal) * temporal  # frame groups never straddle windows
    size, batch, indices, src_fps = None, [], [], 0.0
    for index, frame, src_fps in frames:
        if size is None:
            check_image_size(frame.shape[1], frame.shape[0], what="each video frame")
            size = frame_size(processor, frame.shape[0], frame.shape[1], options.frame_tokens)
        batch.append(_resize(frame, size))
        indices.append(index)
        if len(batch) == window:
            yield _window(processor, batch, indices, src_fps, total)
            batch, indices = [], []
    if batch:
        yield _window(processor, batch, indices, src_fps, total)


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def _window(processor, frames, indices, fps: float, total: int) -> Window:
    video = Video(frames=np.stack(frames), fps=fps, frames_indices=list(indices),
                  total_num_frames=total or indices[-1] + 1)
    inputs = processor(text=[processor.video_token], videos=[video.frames], video_metadata=[video.metadata()],
                       do_sample_frames=False, do_resize=False, add_special_tokens=False, return_tensors="pt")
    return Window(dict(inputs), list(indices))


def prompt_parts(processor, question: str) -> tuple[str, str]:
    """The chat text before and after the video placeholder of `[video, question]` as one user turn."""
    if not isinstance(question, str):
        raise PromptError(f"a question must be a string, got {type(question).__name__}")
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    chat = escape_special_tokens(chat, tokenizer_of(processor))
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prefix, found, suffix = text.partition(video_placeholder(processor))
    if not found:
        raise ConfigError("the processor's chat template renders no video placeholder")
    return prefix, suffix


def text_inputs(processor, text: str, first: bool) -> dict:
    """Model inputs for plain text; special tokens (e.g. BOS) only at the very start of the prompt."""
    ids = tokenizer_of(processor)(text, add_special_tokens=first, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}


@dataclass
class EncodedVideo:
    """A video prefilled into a bounded cache, ready for questions (each forks the cache)."""

    path: str
    cache: DBTrimKVCache
    prefix: str  # chat text before the video, which every question's prompt must share
    frames: int
    frame_groups: int
    prompt_tokens: dict[str, int]
    seconds: float
    token_ids: torch.Tensor | None = None  # the prefilled token ids in order (for retention timelines)


@dataclass
class VideoAnswer:
    question: str
    text: str
    stats: GenerationStats
    cache: DBTrimKVCache | None = None  # the fork that answered (video, question and answer)


@torch.no_grad()
def encode_video(model, processor, path: str | Path, config: DBTrimKVConfig | None = None,
                 options: StreamOptions | None = None, progress: bool = False) -> EncodedVideo:
    """Prefill the chat prefix and every window of `path` into a new `DBTrimKVCache`.

    `config`: eviction settings; by default the checkpoint's, else `configs/default.yaml` (a long
    video must never land in an unbounded cache by accident; pass `DBTrimKVConfig()` for a full one).
    """
    options = check_options(options)
    with _frame_bar(path, options, progress) as bar:
        return encode_windows(model, processor, video_windows(processor, path, options), config, name=str(path),
                              on_window=lambda cache, window: bar.update(len(window.frames_indices)))


def check_takes_video(processor) -> None:
    """ConfigError for a text-only model (its processor is a tokenizer: no video tokens, no vision tower)."""
    if not is_multimodal(processor):
        raise ConfigError("this model is text-only: it cannot watch videos; use a Qwen3-VL model")


@torch.no_grad()
def encode_windows(model, processor, windows: Iterable[Window], config: DBTrimKVConfig | None = None,
                   name: str = "", on_window: Callable[[DBTrimKVCache, Window], None] | None = None) -> EncodedVideo:
    """Prefill the chat prefix, then each window as it comes, into a new `DBTrimKVCache`
    (`config` as in `encode_video`). `on_window(cache, window)` runs after each window's prefill:
    progress, measurements, or a memory cap that raises."""
    check_takes_video(processor)
    prefix, _ = prompt_parts(processor, "")
    cache = DBTrimKVCache(model, config or resolve_eviction(model))
    start = time.perf_counter()
    head = text_inputs(processor, prefix, first=True)
    counts, frames, groups = Counter(tokens_by_modality(head)), 0, 0
    ids = [head["input_ids"][0]]
    with model_lock(model):  # the retention hooks keep per-forward state on the shared model
        prefill(model, head, cache)
    for window in windows:  # the lock is not held while the next window is decoded (or awaited)
        with model_lock(model):
            prefill(model, window.inputs, cache)
        counts.update(tokens_by_modality(window.inputs))
        ids.append(window.inputs["input_ids"][0])
        frames += len(window.frames_indices)
        groups += int(window.inputs["video_grid_thw"][:, 0].sum())
        if on_window is not None:
            on_window(cache, window)
    return EncodedVideo(name, cache, prefix, frames, groups, {m: counts[m] for m in MODALITY_NAMES},
                        time.perf_counter() - start, torch.cat(ids))


def _frame_bar(path, options: StreamOptions, enabled: bool):
    """A progress bar over sampled frames (its total estimated from the container's frame count)."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(disable=True)
    src_fps, total = video_info(path)
    expected = math.ceil(total * min(options.fps / src_fps, 1.0)) if total and options.fps else total or None
    if options.max_frames is not None and expected is not None:
        expected = min(expected, options.max_frames)
    return tqdm(total=expected, unit="frame", desc=Path(path).name, leave=False)


def check_encoded(encoded) -> None:
    """ConfigError unless `encoded` is what `encode_video` / `VideoQA.encode` returned (not a path, not None)."""
    if not isinstance(encoded, EncodedVideo):
        raise ConfigError(f"encoded must be the result of encode() (an EncodedVideo), got {type(encoded).__name__}; "
                          f"encode the video first: ask(encode(path), question)")


@torch.no_grad()
def ask(model, processor, encoded: EncodedVideo, question: str, max_new_tokens: int = 64) -> VideoAnswer:
    """Answer one question (greedy) from a copy of the video cache; the video cache is left as it was.

    While it answers, the video cache and its copy are both alive: twice the bounded KV memory.
    """
    check_encoded(encoded)
    prefix, suffix = prompt_parts(processor, question)
    if prefix != encoded.prefix:
        raise ConfigError("the chat template puts question-dependent text before the video; "
                          "the encoded video cannot be reused for this question")
    inputs = text_inputs(processor, suffix, first=False)
    cache = encoded.cache.clone()
    timings: dict = {}
    new = generate(model, inputs, cache, max_new_tokens=max_new_tokens, timings=timings,
                   do_sample=False, temperature=None, top_p=None, top_k=None)[0]
    text = tokenizer_of(processor).decode(new, skip_special_tokens=True)
    stats = collect_stats(cache, inputs, 0, new.numel(), timings, encoded.cache.num_evictions)
    prompt = Counter(encoded.prompt_tokens) + Counter(stats.prompt_tokens)
    return VideoAnswer(question, text, replace(stats, prompt_tokens={m: prompt[m] for m in MODALITY_NAMES}), cache)


class VideoQA:
    """A model, its processor and the settings, bound once: `encode(path)` then `ask(encoded, question)`.

    The dataset runner talks to this interface only, so tests can stand in a fake answerer.
    """

    def __init__(self, model, processor, config: DBTrimKVConfig | None = None, options: StreamOptions | None = None,
                 max_new_tokens: int = 64, progress: bool = False):
        check_takes_video(processor)
        self.model, self.processor = model, processor
        self.config, self.options = config, check_options(options)
        self.max_new_tokens, self.progress = max_new_tokens, progress

    def encode(self, path: str | Path) -> EncodedVideo:
        return encode_video(self.model, self.processor, path, self.config, self.options, progress=self.progress)

    def ask(self, encoded: EncodedVideo, question: str) -> VideoAnswer:
        """Answer `question` about `encoded`, the result of `encode(path)` (ConfigError for anything else)."""
        return ask(self.model, self.processor, encoded, question, self.max_new_tokens)
