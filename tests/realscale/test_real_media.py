"""Real media sizes through the real Qwen3-VL processor settings (configs/shapes/qwen3-vl-4b.yaml):
the vision token counts equal Qwen3-VL's resizing rules, written out here independently. (The
engine runs on these media, with chunked prefill, eviction and peak RSS measured, in
bench/bench_real_shapes.py: too slow for a test at the real vision width.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dbtrimkv.loading import shapes
from dbtrimkv.inputs.media import load_video
from dbtrimkv.inputs.prompts import VideoOptions, build_inputs

FACTOR, MERGE = 32, 4  # patch 16 x spatial merge 2; 2 x 2 patches per vision token


def image_grid(height: int, width: int, min_pixels=65536, max_pixels=16777216) -> tuple[int, int, int]:
    """Qwen2-VL / Qwen3-VL smart resize: sides rounded to multiples of 32, area kept within [min, max]."""
    h, w = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / FACTOR) * FACTOR, math.floor(width / beta / FACTOR) * FACTOR
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return 1, h // 16, w // 16


def video_grid(frames: int, height: int, width: int, min_pixels=4096, max_pixels=25165824, frame_tokens=768):
    """Qwen3-VL video resize with qwen-vl-utils' per-frame cap: each frame gets at most
    min(768 tokens, the pixel budget's even share), at least 1.05 x the minimum."""
    per_frame = max(min(frame_tokens * FACTOR * FACTOR, max_pixels // frames), int(min_pixels * 1.05))
    budget = per_frame * frames
    t = math.ceil(frames / 2) * 2
    h, w = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
    if t * h * w > budget:
        beta = math.sqrt(frames * height * width / budget)
        h, w = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR), max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    return t // 2, h // 16, w // 16


@pytest.fixture(scope="module")
def processor():
    return shapes.build_processor("qwen3-vl-4b")


@pytest.mark.parametrize("width, height, tokens", [(1920, 1080, 2040), (4000, 3000, 11750), (640, 480, 300),
                                                    (100, 60, 77)])  # upscaled to >= 65536 px
def test_photo_vision_tokens(processor, width, height, tokens):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    inputs = build_inputs(processor, [[{"role": "user", "content": [{"type": "image", "image": photo},
                                                                     {"type": "text", "text": "What is this?"}]}]])
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert grid == image_grid(height, width)
    assert int((inputs["mm_token_type_ids"] == 1).sum()) == math.prod(grid) // MERGE == tokens


def test_two_minute_720p_video_tokens(processor):
    """2 minutes at 30 fps, sampled at the processor's 2 fps: 240 frames of 1280x720."""
    patches = processor.video_processor.get_num_of_video_patches(240, 720, 1280)
    assert video_grid(240, 720, 1280) == (120, 14, 26)
    assert patches == 120 * 14 * 26 and patches // MERGE == 10920


def test_720p_30fps_clip_decodes_and_tokenizes(tmp_path, processor):
    """A real 720p 30 fps mp4 (made here, small on disk), decoded at 2 fps, through the processor."""
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        base = np.stack([(np.arange(1280)[None, :] // 5 + c * 40 + np.zeros((720, 1))) % 256 for c in range(3)], -1)
        for t in range(60):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * t, axis=1).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size < 2_000_000
    video = load_video(path, fps=2.0, max_frames=None)
    frames, height, width = video.frames.shape[:3]
    assert frames == 4 and video.frames_indices == [0, 15, 30, 45]
    assert height * width <= 768 * 32 * 32 and abs(width / height - 1280 / 720) < 0.01  # decode caps frame pixels
    chat = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "What?"}]}]
    inputs = build_inputs(processor, [chat], video=VideoOptions(fps=2.0, max_frames=None))
    grid = tuple(inputs["video_grid_thw"][0].tolist())
    assert grid == video_grid(4, height, width)
    assert int((inputs["mm_token_type_ids"] == 2).sum()) == math.prod(grid) // MERGE
