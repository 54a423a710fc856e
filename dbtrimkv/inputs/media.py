"""Read images and videos for the processor in bounded memory, with clear errors for bad files.

Why: transformers' Qwen3-VL processor wants decoded frames plus metadata (it would otherwise try
torchcodec / torchvision video readers that CPU machines do not have), and a small file can declare
an enormous picture (a 12 KB PNG of 10000 x 10000 pixels, a 7 MB clip of 6000 px frames). So:

- Images: `images.py` (sizes read from the header before any pixel is decoded; large images
  downscaled while decoding).
- Videos: decoded with PyAV one frame at a time; each kept frame is resized by libswscale as it is
  converted, so no full-resolution RGB frame is ever kept. `load_video` samples at `fps`; when that
  would exceed `max_frames` it spreads `max_frames` frames evenly over the whole duration (as
  qwen-vl-utils does) instead of keeping only the beginning, and says so in `Video.sampling`.
  `iter_video_frames` streams, so long videos never need to be held in memory whole.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from transformers.video_utils import VideoMetadata

from ..errors import MediaError
from .images import MAX_ASPECT_RATIO, check_image_size, fit_pixels, load_image, not_found

MAX_VIDEO_FRAME_PIXELS = 40_000_000  # source frame size a video may declare (8K UHD is 33 MP)
VIDEO_MAX_FRAME_PIXELS = 768 * 32 * 32  # default per-frame ceiling after decoding (qwen-vl-utils' VIDEO_MAX_PIXELS)


@dataclass
class Video:
    """Decoded frames (RGB uint8, T x H x W x 3) and what the processor needs to time them."""

    frames: np.ndarray
    fps: float  # frame rate of the source
    frames_indices: list[int] = field(default_factory=list)  # index of each kept frame in the source
    total_num_frames: int = 0
    source: str = ""
    sampling: str = ""  # how the frames were picked, when it differs from what was asked (else "")

    @property
    def duration(self) -> float:
        return self.total_num_frames / self.fps if self.fps else 0.0

    def metadata(self) -> dict:
        """Metadata in the form of `transformers.video_utils.VideoMetadata`."""
        t, h, w = self.frames.shape[:3]
        return VideoMetadata(
            total_num_frames=self.total_num_frames or t, fps=self.fps, width=w, height=h,
            duration=self.duration, video_backend="pyav", frames_indices=list(self.frames_indices),
        )


def _open_video(path):
    import av

    if path is None or not isinstance(path, (str, os.PathLike)):
        raise MediaError(f"a video must be a path or a list of frames, got {type(path).__name__}")
    if not Path(path).exists():
        raise not_found("video", path)
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video path is not a file: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot read video {path}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"cannot read video {path}: the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
    if width * height > MAX_VIDEO_FRAME_PIXELS:
        container.close()
        raise MediaError(f"video {path} has {width}x{height} pixel frames, over the "
                         f"{MAX_VIDEO_FRAME_PIXELS / 1e6:.0f} megapixel limit")
    if width and height:
        try:
            check_image_size(width, height, what=f"video {path}: each frame")
        except MediaError:
            container.close()
            raise
    return container


def _stream_fps(stream) -> float:
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    return fps if math.isfinite(fps) and fps > 0 else 24.0


def _stream_frames(container, stream, fps: float) -> int:
    frames = stream.frames or 0
    if not frames and stream.duration and stream.time_base:
        frames = round(float(stream.duration * stream.time_base) * fps)
    if not frames and container.duration:
        frames = round(container.duration / 1_000_000 * fps)
    return max(int(frames), 0)


def video_info(path: str | Path) -> tuple[float, int]:
    """(frames per second, number of frames) of a video file (0 frames when the container does not say)."""
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        return fps, _stream_frames(container, stream, fps)
    finally:
        container.close()


def _check_sampling(fps: float, max_frames: int | None, every_frame_ok: bool = True) -> None:
    """fps: a finite number > 0 (0 = every frame, where `every_frame_ok`); max_frames: >= 1 or None."""
    if (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps < 0
            or (fps == 0 and not every_frame_ok)):
        raise MediaError(f"video fps must be a positive number{' (0 = every frame)' if every_frame_ok else ''}, "
                         f"got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer))
                                   or max_frames < 1):
        raise MediaError(f"video max_frames must be a positive integer or None, got {max_frames!r}")


def _decoded(container, stream, path) -> Iterator[tuple[int, object]]:
    import av

    try:
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame
    except (av.FFmpegError, ValueError, MemoryError) as exc:
        raise MediaError(f"cannot read video {path}: decoding failed ({exc})") from None


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """The frame as RGB uint8, resized by libswscale to `size` (height, width) during the conversion."""
    if size is None or (frame.height, frame.width) == tuple(size):
        return frame.to_ndarray(format="rgb24")
    height, width = size
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")


def iter_video_frames(path: str | Path, fps: float = 2.0, max_frames: int | None = None,
                      start_frame: int = 0, frame_size: Callable[[int, int], tuple[int, int]] | None = None,
                      ) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yield `(source frame index, RGB uint8 frame, source fps)` sampled at about `fps`.

    Sampling keeps the first source frame of every 1/fps interval, so the result does not depend
    on how the stream is chunked. Stops after `max_frames` sampled frames. `frame_size(height,
    width)` -> (height, width) resizes every kept frame while it is converted (default: frames over
    `VIDEO_MAX_FRAME_PIXELS` are scaled down to it); only one source frame is decoded at a time.
    """
    _check_sampling(fps, max_frames)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        src_fps = _stream_fps(stream)
        step = max(src_fps / fps, 1.0) if fps else 1.0
        next_pick, count, size = 0.0, 0, None
        for index, frame in _decoded(container, stream, path):
            if index < start_frame or index + 1e-9 < next_pick:
                continue
            next_pick = math.floor(index / step + 1e-9) * step + step
            if size is None:
                size = _frame_size(frame_size, frame.height, frame.width)
            yield index, _rgb(frame, size), src_fps
            count += 1
            if max_frames is not None and count >= max_frames:
                return
        if count == 0 and start_frame == 0:
            raise MediaError(f"cannot read video {path}: no frames could be decoded")
    finally:
        container.close()


def _frame_size(frame_size, height: int, width: int) -> tuple[int, int]:
    if frame_size is not None:
        return tuple(int(v) for v in frame_size(height, width))
    w, h = fit_pixels(width, height, VIDEO_MAX_FRAME_PIXELS)
    return (h, w)


def sample_indices(total: int, src_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """Source frame indices to keep: every 1/fps interval's first frame, or, when that is more than
    `max_frames`, `max_frames` indices spread evenly from the first to the last frame."""
    step = max(src_fps / fps, 1.0) if fps else 1.0
    grid = sorted({i for i in (math.ceil(k * step - 1e-9) for k in range(math.ceil(total / step))) if i < total})
    if max_frames is None or len(grid) <= max_frames:
        return grid
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, max_frames)})


def load_video(path: str | Path, fps: float = 2.0, max_frames: int | None = 64,
               frame_size: Callable[[int, int, int], tuple[int, int]] | None = None) -> Video:
    """Decode a video file at about `fps` frames per second, at most `max_frames` frames spread over
    the whole duration. `frame_size(num_frames, height, width)` -> (height, width) picks the size
    every frame is resized to while decoding (default: at most `VIDEO_MAX_FRAME_PIXELS` pixels)."""
    _check_sampling(fps, max_frames)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        src_fps = _stream_fps(stream)
        total = _stream_frames(container, stream, src_fps)
        if total:
            wanted = sample_indices(total, src_fps, fps, max_frames)
            frames, indices = _decode_indices(container, stream, path, set(wanted), len(wanted), frame_size)
        else:
            step = src_fps / fps if fps else 1.0
            frames, indices, total = _decode_thinned(container, stream, path, step, max_frames, frame_size)
    finally:
        container.close()
    if not frames:
        raise MediaError(f"cannot read video {path}: no frames could be decoded")
    on_grid = len(indices) == len(sample_indices(total, src_fps, fps, None))
    sampling = "" if on_grid else (
        f"video {Path(path).name}: {len(indices)} frames spread over {total / src_fps:.1f} s "
        f"({len(indices) * src_fps / total:.2f} fps, within the {max_frames}-frame limit; asked for "
        f"{f'{fps:g} fps' if fps else 'every frame'})")
    video = frames_to_video(frames, fps=src_fps, frames_indices=indices, total_num_frames=total, source=str(path))
    video.sampling = sampling
    return video


def _decode_indices(container, stream, path, wanted: set[int], count: int, frame_size):
    frames, indices, size = [], [], None
    last = max(wanted)
    for index, frame in _decoded(container, stream, path):
        if index in wanted:
            if size is None:
                size = _sized(frame_size, count, frame.height, frame.width)
            frames.append(_rgb(frame, size))
            indices.append(index)
        if index >= last:
            break
    return frames, indices


def _decode_thinned(container, stream, path, step: float, max_frames: int | None, frame_size):
    """For streams that do not say how long they are: sample every `step` frames, and whenever more
    than `max_frames` are kept, drop every other one and double the step (stays spread over the whole)."""
    step = max(step, 1.0)
    frames, indices, size, next_pick, seen = [], [], None, 0.0, 0
    for index, frame in _decoded(container, stream, path):
        seen = index + 1
        if index + 1e-9 < next_pick:
            continue
        next_pick += step
        while next_pick <= index:
            next_pick += step
        if size is None:
            size = _sized(frame_size, max_frames or 64, frame.height, frame.width)
        frames.append(_rgb(frame, size))
        indices.append(index)
        if max_frames is not None and len(frames) > max_frames:
            frames, indices, step = frames[::2], indices[::2], step * 2
            next_pick = indices[-1] + step
    return frames, indices, seen


def _sized(frame_size, count: int, height: int, width: int) -> tuple[int, int]:
    if frame_size is not None:
        return tuple(int(v) for v in frame_size(max(count, 2), height, width))
    return _frame_size(None, height, width)


def frames_to_video(frames, fps: float = 2.0, frames_indices: list[int] | None = None,
                    total_num_frames: int | None = None, source: str = "frames", max_frames: int | None = None) -> Video:
    """A `Video` from a list of frames (PIL images, paths or HxWx3 arrays) at `fps`; with `max_frames`, a
    longer list keeps `max_frames` frames spread evenly over it, as a video file does (the `sampling` note says so)."""
    if frames is None or len(frames) == 0:
        raise MediaError(f"video {source} has no frames")
    _check_sampling(fps, max_frames, every_frame_ok=False)
    if max_frames is not None and len(frames) > max_frames:
        given = list(range(len(frames))) if frames_indices is None else list(frames_indices)
        keep = sample_indices(len(frames), fps, fps, max_frames)
        video = frames_to_video([frames[i] for i in keep], fps, [given[min(i, len(given) - 1)] for i in keep],
                                total_num_frames or len(frames), source)
        video.sampling = (f"video {source}: {len(keep)} of the {len(frames)} frames given, spread over them "
                          f"(within the {max_frames}-frame limit)")
        return video
    arrays = [f if _is_rgb_frame(f) else np.asarray(load_image(f, VIDEO_MAX_FRAME_PIXELS)) for f in frames]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        arrays = [a if a.shape == shape else np.asarray(Image.fromarray(a).resize((shape[1], shape[0])))
                  for a in arrays]
    stacked = np.stack(arrays)
    if len(stacked) == 1:  # the vision tower patches frames in pairs
        stacked = np.concatenate([stacked, stacked])
    indices = list(frames_indices) if frames_indices is not None else list(range(len(arrays)))
    if len(indices) < len(stacked):
        indices = indices + [indices[-1]] * (len(stacked) - len(indices))
    return Video(frames=stacked, fps=fps, frames_indices=indices,
                 total_num_frames=total_num_frames or (indices[-1] + 1), source=source)


def _is_rgb_frame(frame) -> bool:
    """A decoded frame that is already RGB uint8 within the size limits (no copy needed)."""
    return (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3
            and 0 < frame.shape[0] * frame.shape[1] <= VIDEO_MAX_FRAME_PIXELS
            and max(frame.shape[:2]) / min(frame.shape[:2]) <= MAX_ASPECT_RATIO)
