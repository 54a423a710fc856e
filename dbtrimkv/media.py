"""Read images and videos for the processor, with clear errors for bad files.

Why: transformers' Qwen3-VL processor wants decoded frames plus metadata (it would otherwise try
torchcodec / torchvision video readers that CPU machines do not have). Videos are decoded with
PyAV at a chosen sampling rate; `iter_video_frames` streams them so long videos never need to be
held in memory whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.video_utils import VideoMetadata

from .errors import MediaError

def load_image(image) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise MediaError(f"image array must have shape HxWx3 (or 4), got {tuple(image.shape)}")
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    path = Path(image)
    if not path.exists():
        raise MediaError(f"image not found: {path}")
    if not path.is_file():
        raise MediaError(f"image path is not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"cannot read image {path}: not a valid or complete image file ({exc})") from None


@dataclass
class Video:
    """Decoded frames (RGB uint8, T x H x W x 3) and what the processor needs to time them."""

    frames: np.ndarray
    fps: float  # frame rate of the source
    frames_indices: list[int] = field(default_factory=list)  # index of each kept frame in the source
    total_num_frames: int = 0
    source: str = ""

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


def _open_video(path: Path):
    import av

    if not path.exists():
        raise MediaError(f"video not found: {path}")
    if not path.is_file():
        raise MediaError(f"video path is not a file: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"cannot read video {path}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"cannot read video {path}: the file has no video stream")
    return container


def video_info(path: str | Path) -> tuple[float, int]:
    """(frames per second, number of frames) of a video file."""
    path = Path(path)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        frames = stream.frames
        if not frames and stream.duration:
            frames = round(float(stream.duration * stream.time_base) * fps)
        return fps, int(frames or 0)
    finally:
        container.close()


def iter_video_frames(path: str | Path, fps: float = 2.0, max_frames: int | None = None,
                      start_frame: int = 0) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yield `(source frame index, RGB uint8 frame, source fps)` sampled at about `fps`.

    Sampling keeps the first source frame of every 1/fps interval, so the result does not depend
    on how the stream is chunked. Stops after `max_frames` sampled frames.
    """
    import av

    path = Path(path)
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        step = max(src_fps / fps, 1.0) if fps and fps > 0 else 1.0
        next_pick, count = 0.0, 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index < start_frame or index + 1e-9 < next_pick:
                    continue
                next_pick = math.floor(index / step + 1e-9) * step + step
                yield index, frame.to_ndarray(format="rgb24"), src_fps
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot read video {path}: decoding failed ({exc})") from None
        if count == 0 and start_frame == 0:
            raise MediaError(f"cannot read video {path}: no frames could be decoded")
    finally:
        container.close()


def load_video(path: str | Path, fps: float = 2.0, max_frames: int | None = 64) -> Video:
    """Decode a video file at about `fps` frames per second, at most `max_frames` frames."""
    picked, indices, src_fps = [], [], 24.0
    for index, frame, src_fps in iter_video_frames(path, fps=fps, max_frames=max_frames):
        picked.append(frame)
        indices.append(index)
    total = video_info(path)[1] or (indices[-1] + 1)
    return frames_to_video(picked, fps=src_fps, frames_indices=indices, total_num_frames=total, source=str(path))


def frames_to_video(frames, fps: float = 2.0, frames_indices: list[int] | None = None,
                    total_num_frames: int | None = None, source: str = "frames") -> Video:
    """A `Video` from a list of frames (PIL images, paths or HxWx3 arrays) at `fps`."""
    if frames is None or len(frames) == 0:
        raise MediaError(f"video {source} has no frames")
    arrays = [np.asarray(load_image(f)) for f in frames]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        arrays = [np.asarray(Image.fromarray(a).resize((shape[1], shape[0]))) for a in arrays]
    stacked = np.stack(arrays)
    if len(stacked) == 1:  # the vision tower patches frames in pairs
        stacked = np.concatenate([stacked, stacked])
    indices = list(frames_indices) if frames_indices is not None else list(range(len(arrays)))
    if len(indices) < len(stacked):
        indices = indices + [indices[-1]] * (len(stacked) - len(indices))
    return Video(frames=stacked, fps=fps, frames_indices=indices,
                 total_num_frames=total_num_frames or (indices[-1] + 1), source=source)
