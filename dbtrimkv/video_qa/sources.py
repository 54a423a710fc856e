"""Frames of a video source as they arrive: a file (optionally paced at real time), a camera, a stream.

Why: a live session (`video_qa.live`) consumes `(index, RGB frame, fps)` with `index / fps` the
frame's time, whatever the source. Files go through `media.iter_video_frames` (frame numbers,
the file's rate); with `realtime` each frame is released when its time has come, as a camera
would deliver it. Anything else PyAV opens (a V4L2 device such as `/dev/video0`, `rtsp://`,
`http://`, `udp://`, `file:` URLs, or any source with an explicit `--format`) is read by
presentation time, sampled at `fps`, and timed in milliseconds (`index` = ms, fps = 1000).
`open_source` opens the source and reads its first frame at once, so a missing file, a directory,
an absent camera or an unreachable stream is a `MediaError` before anything else happens.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import MediaError
from ..inputs.media import iter_video_frames

MILLISECONDS = 1000.0


def is_file_source(source: str, format: str | None = None) -> bool:
    """A plain video file (decoded by `media`), rather than a device or a URL for PyAV."""
    return format is None and "://" not in source and not source.startswith(("/dev/", "file:")) \
        and Path(source).is_file()


def open_source(source: str, fps: float = 1.0, realtime: bool = False, format: str | None = None,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[int, np.ndarray, float]]:
    """`stream_frames`, with the source opened and its first frame read now (MediaError if it cannot be)."""
    _check_local(source, format)
    frames = stream_frames(source, fps=fps, realtime=realtime, format=format, clock=clock, sleep=sleep)
    try:
        first = next(frames)
    except StopIteration:
        raise MediaError(f"video source {source} delivered no frames") from None
    return itertools.chain([first], frames)


def _check_local(source: str, format: str | None) -> None:
    """A path (not a URL) must exist and must not be a directory."""
    if format is not None or "://" in source or source.startswith("file:"):
        return
    path = Path(source)
    if not source.strip():
        raise MediaError("the video source is empty: give a video file, a camera device or a stream URL")
    if not path.exists():
        what = "camera device" if source.startswith("/dev/") else "video file"
        raise MediaError(f"{what} not found: {source} (a source is a video file, a camera device such as "
                         f"/dev/video0, or a stream URL such as rtsp://host/path)")
    if path.is_dir():
        raise MediaError(f"video source {source} is a directory, not a video file or a camera device")


def stream_frames(source: str, fps: float = 1.0, realtime: bool = False, format: str | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[int, np.ndarray, float]]:
    """`(index, RGB uint8 frame, fps)` sampled at about `fps` frames per second of the source."""
    if is_file_source(source, format):
        frames = iter_video_frames(source, fps=fps)
        if not realtime:
            yield from frames
            return
        start = clock()
        for index, frame, src_fps in frames:
            delay = start + index / src_fps - clock()
            if delay > 0:
                sleep(delay)
            yield index, frame, src_fps
        return
    yield from _pyav_frames(source, fps, format, clock)


def _pyav_frames(source: str, fps: float, format: str | None, clock) -> Iterator[tuple[int, np.ndarray, float]]:
    import av

    if format is None and source.startswith("/dev/video"):
        format = "v4l2"
    try:
        container = av.open(source, format=format, timeout=10.0)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"cannot open video source {source}: {exc}") from None
    try:
        if not container.streams.video:
            raise MediaError(f"video source {source} has no video stream")
        stream = container.streams.video[0]
        step = 1.0 / fps if fps and fps > 0 else 0.0
        start, next_pick = clock(), 0.0
        try:
            for frame in container.decode(stream):
                seconds = float(frame.time) if frame.time is not None else clock() - start
                if seconds + 1e-9 < next_pick:
                    continue
                next_pick = (seconds // step + 1) * step if step else seconds
                yield round(seconds * MILLISECONDS), frame.to_ndarray(format="rgb24"), MILLISECONDS
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"cannot read video source {source}: decoding failed ({exc})") from None
    finally:
        container.close()
