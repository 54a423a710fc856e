"""Media in bounded memory: high-resolution clips and image bombs never decode at full size.

The bound asserted: peak RSS growth < 500 MB for a 64-frame 6000 x 6000 clip through the pipeline
(full-resolution RGB frames alone would be 64 x 108 MB = 6.9 GB), < 500 MB for a 10000 x 10000 1-bit PNG.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_clip
from media_files import png_bytes, write_big_clip

from dbtrimkv.errors import MediaError
from dbtrimkv.inputs.media import VIDEO_MAX_FRAME_PIXELS, iter_video_frames, load_image, load_video, sample_indices
from dbtrimkv.inputs.prompts import VideoOptions

RSS_BOUND_MB = 500


@pytest.fixture(scope="module")
def big_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big6000.mp4"
    write_big_clip(path, side=6000, frames=64, fps=2)
    assert path.stat().st_size < 10 * 2**20
    return path


def test_6000px_clip_through_the_pipeline_in_bounded_memory(recall_pipe, big_clip, peak_rss):
    with peak_rss() as rss:
        out = recall_pipe.chat("what happens?", videos=[big_clip], max_new_tokens=2, progress=False)
    print(f"peak RSS growth, 64-frame 6000 px clip through the pipeline: {rss.growth_mb:.0f} MB")
    assert out.stats.prompt_tokens["video"] > 0
    assert rss.growth_mb < RSS_BOUND_MB


def test_6000px_clip_frames_are_resized_while_decoding(big_clip, peak_rss):
    with peak_rss() as rss:
        video = load_video(big_clip, fps=2, max_frames=64)
    assert video.frames.shape[0] == 64 and video.frames.shape[1] * video.frames.shape[2] <= VIDEO_MAX_FRAME_PIXELS
    assert video.frames_indices == list(range(64))
    assert rss.growth_mb < RSS_BOUND_MB
    frames = [frame for _, frame, _ in iter_video_frames(big_clip, fps=2, max_frames=3)]
    assert frames[0].shape[0] * frames[0].shape[1] <= VIDEO_MAX_FRAME_PIXELS


def test_1bit_10000px_png_in_bounded_memory(peak_rss):
    data = png_bytes(10000, 10000)
    assert len(data) < 20_000
    with peak_rss() as rss:
        image = load_image(data)
    print(f"peak RSS growth, 10000 x 10000 1-bit PNG: {rss.growth_mb:.0f} MB")
    assert image.mode == "RGB" and image.size == (4096, 4096)
    assert rss.growth_mb < RSS_BOUND_MB


def test_long_video_is_sampled_over_its_whole_duration(tmp_path, recall_pipe):
    path = tmp_path / "long.mp4"
    write_clip(path, frames=160, fps=4)  # 40 s: 80 frames at 2 fps, over the 64-frame limit
    video = load_video(path, fps=2, max_frames=64)
    assert len(video.frames_indices) == 64
    assert video.frames_indices[0] == 0 and video.frames_indices[-1] == 159  # the end is not dropped
    gaps = np.diff(video.frames_indices)
    assert gaps.min() >= 2 and gaps.max() <= 3
    assert "64 frames spread over 40.0 s" in video.sampling
    out = recall_pipe.chat("what happens?", videos=[path], max_new_tokens=1, progress=False)
    assert out.stats.notes == [video.sampling] and "note: video long.mp4: 64 frames" in out.stats.summary()


def test_short_video_keeps_the_fps_grid(tmp_path):
    path = tmp_path / "short.mp4"
    write_clip(path, frames=24, fps=8)
    video = load_video(path, fps=2, max_frames=64)
    assert video.frames_indices == [0, 4, 8, 12, 16, 20] and video.sampling == ""
    assert [i for i, _, _ in iter_video_frames(path, fps=2)] == video.frames_indices


@pytest.mark.parametrize("total,src,fps,limit", [(160, 4, 2, 64), (10, 30, 2, 64), (1000, 29.97, 1, 8), (5, 5, 10, 3)])
def test_sample_indices(total, src, fps, limit):
    indices = sample_indices(total, src, fps, limit)
    assert indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < total
    assert len(indices) <= limit
    if len(sample_indices(total, src, fps, None)) > limit:
        assert indices[0] == 0 and indices[-1] == total - 1


def test_unknown_length_stream_is_thinned_not_truncated(tmp_path, monkeypatch):
    from dbtrimkv.inputs import media

    path = tmp_path / "clip.mp4"
    write_clip(path, frames=100, fps=10)
    monkeypatch.setattr(media, "_stream_frames", lambda *a: 0)
    video = load_video(path, fps=10, max_frames=16)
    assert 8 <= len(video.frames_indices) <= 16
    assert video.frames_indices[0] == 0 and video.frames_indices[-1] >= 100 - 100 // 8
    assert "spread" in video.sampling


@pytest.mark.parametrize("kwargs", [dict(fps=-1), dict(fps=float("nan")), dict(fps="2"),
                                    dict(max_frames=0), dict(max_frames=-3), dict(max_frames=2.5)])
def test_bad_sampling_arguments(tmp_path, kwargs):
    path = tmp_path / "c.mp4"
    write_clip(path, frames=4)
    with pytest.raises(MediaError):
        load_video(path, **{"fps": 2, "max_frames": 4, **kwargs})


def test_video_options_defaults_unchanged():
    assert VideoOptions().fps == 2.0 and VideoOptions().max_frames == 64
