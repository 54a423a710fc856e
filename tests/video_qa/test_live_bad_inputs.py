"""Bad input to live sessions and `VideoQA`: one clear `DBTrimKVError` naming the argument at fault,
never a traceback from inside transformers / PIL / numpy, never an answer over nothing; odd but valid
frames (grayscale, RGBA, PIL images, floats in [0, 1]) just work."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import dbtrimkv
from dbtrimkv.errors import ConfigError, DBTrimKVError, MediaError
from dbtrimkv.video_qa import StreamOptions, VideoQA
from dbtrimkv.video_qa.live import LiveSession, as_frame

QUESTION = "What happens?"


def rgb(seed: int = 0, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def session(gated):
    model, processor = gated
    return LiveSession(model, processor, max_new_tokens=2)


def started(session, frames: int = 2) -> LiveSession:
    for index in range(frames):
        session.push(index, rgb(index), 2.0)
    assert session.frames == frames
    return session


# 1. a question before any frame is in the cache

def test_ask_before_any_frame_refuses_to_invent_an_answer(session):
    with pytest.raises(MediaError, match="no frame has been pushed yet"):
        session.ask(QUESTION)
    session.push(0, rgb(), 2.0)  # one frame waits for its group partner: still nothing in the cache
    with pytest.raises(MediaError, match="no frame is in the session yet.*wait for a full window"):
        session.ask(QUESTION)
    session.push(1, rgb(1), 2.0)
    answer = session.ask(QUESTION)
    assert (answer.frames, answer.stream_seconds) == (2, 0.5)


def test_ask_after_flush_of_a_partial_window_answers(session):
    session.push(0, rgb(), 2.0)
    session.flush()  # the end of a source: its last frame counts
    assert session.ask(QUESTION).frames == 1


# 2. max_new_tokens

@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"])
def test_ask_refuses_a_max_new_tokens_below_one_or_not_an_integer(session, value):
    started(session)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        session.ask(QUESTION, max_new_tokens=value)


def test_ask_max_new_tokens_given_and_not_given(session):
    started(session)
    assert session.ask(QUESTION, max_new_tokens=1).stats.new_tokens <= 1
    assert session.ask(QUESTION).stats.new_tokens <= 2  # the session's max_new_tokens


@pytest.mark.parametrize("value", [0, -1, None, 2.0])
def test_session_refuses_a_bad_default_max_new_tokens(gated, value):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        LiveSession(*gated, max_new_tokens=value)


# 3. push: fps, index, frame

@pytest.mark.parametrize("fps", [0, 0.0, -1, -2.5, math.nan, math.inf, "2", None, True])
def test_push_refuses_an_fps_that_is_not_a_finite_number_above_zero(session, fps):
    with pytest.raises(ConfigError, match="fps must be a finite number > 0"):
        session.push(0, rgb(), fps)
    assert session.memory()["pending_frames"] == 0  # nothing half-added


def test_push_takes_numpy_numbers(session):
    session.push(np.int64(0), rgb(), np.float32(2.0))
    session.push(np.uint16(1), rgb(1), 2)  # the same rate, whatever its type
    assert (session.frames, session.stream_seconds) == (2, 0.5)


def test_push_refuses_an_fps_that_changes_within_the_session(session):
    session.push(0, rgb(), np.float32(29.97))
    session.push(1, rgb(1), 29.97)  # float32 and float64 readings of one rate are the same rate
    with pytest.raises(ConfigError, match="fps must stay the same"):
        session.push(2, rgb(2), 4.0)


@pytest.mark.parametrize("index", [-5, -1, 1.0, "3", None, True, math.nan])
def test_push_refuses_an_index_that_is_not_a_non_negative_integer(session, index):
    with pytest.raises(ConfigError, match="index must be a non-negative integer"):
        session.push(index, rgb(), 2.0)


def test_push_refuses_an_index_that_goes_back_in_time_but_takes_a_repeated_one(session):
    session.push(5, rgb(), 2.0)
    with pytest.raises(ConfigError, match="index must not decrease.*got 4 after 5"):
        session.push(4, rgb(1), 2.0)
    session.push(5, rgb(1), 2.0)  # the same time twice (a millisecond clock can repeat): fine
    assert (session.frames, session.stream_seconds) == (2, 2.5)


@pytest.mark.parametrize("frame, match", [
    (None, "frame must be an HxWx3 RGB array"),
    ("frame.png", "frame must be an HxWx3 RGB array"),
    ([[0, 0], [0, 0]], "frame must be an HxWx3 RGB array"),
    (np.zeros((3, 32, 32), dtype=np.uint8), r"frame has shape \(3, 32, 32\), channels first"),
    (np.zeros((2, 32, 32, 3), dtype=np.uint8), "frame: image array must have shape"),
    (np.zeros(32, dtype=np.uint8), "frame: image array must have shape"),
    (np.zeros((32, 32, 2), dtype=np.uint8), "frame: image array must have shape"),
    (np.zeros((0, 32, 3), dtype=np.uint8), "frame is empty"),
    (np.zeros((32, 32, 3), dtype=np.complex64), "frame: image array must hold numbers"),
    (np.zeros((32, 32, 3), dtype=object), "frame: image array must hold numbers"),
    (np.full((32, 32, 3), 300, dtype=np.int16), "frame: integer image array values must be in 0..255"),
    (np.full((32, 32, 3), -0.5, dtype=np.float32), "frame: float image array values must be in 0..1"),
    (np.full((32, 32, 3), np.nan, dtype=np.float32), "frame: image array contains NaN"),
])
def test_push_refuses_a_frame_that_is_not_an_image(session, frame, match):
    with pytest.raises(MediaError, match=match):
        session.push(0, frame, 2.0)
    assert session.memory()["pending_frames"] == 0


def test_grayscale_rgba_pil_and_float_frames_just_work(session):
    base = rgb()
    gray = base[..., 0]
    rgba = np.concatenate([base, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    for index, frame in enumerate([gray, rgba, Image.fromarray(base), base / 255.0, base[:, ::-1], rgb(5, (48, 64))]):
        session.push(index, frame, 2.0)
    answer = session.ask(QUESTION)
    assert answer.frames == 6 and answer.stream_seconds == 2.5
    assert np.array_equal(as_frame(gray), np.repeat(gray[..., None], 3, axis=-1))
    assert np.array_equal(as_frame(gray[..., None]), as_frame(gray))
    assert np.array_equal(as_frame(rgba), base)  # alpha dropped
    assert np.array_equal(as_frame(Image.fromarray(base)), base)
    assert np.array_equal(as_frame(Image.fromarray(gray)), as_frame(gray))  # any PIL mode, converted to RGB
    # floats are read as dbtrimkv.inputs.images reads image arrays: [0, 1] scaled by 255, up to 255 as they are
    assert np.array_equal(as_frame(base / 255.0), base)
    assert np.array_equal(as_frame(base.astype(np.float32)), base)
    assert np.array_equal(as_frame(base.astype(np.int32)), base)
    assert as_frame(base) is base  # the ordinary frame is not copied


# 4. a text-only model

def test_live_session_with_a_text_only_model_says_so():
    model, tokenizer = dbtrimkv.load_model("tiny-text")
    with pytest.raises(ConfigError, match="text-only"):
        LiveSession(model, tokenizer)
    with pytest.raises(ConfigError, match="text-only"):
        VideoQA(model, tokenizer)


# 5. VideoQA arguments; LiveSession options

@pytest.mark.parametrize("encoded", ["clip.mp4", None, {"cache": None}])
def test_video_qa_ask_needs_the_result_of_encode(gated, encoded):
    qa = VideoQA(*gated)
    with pytest.raises(ConfigError, match=r"encoded must be the result of encode\(\)"):
        qa.ask(encoded, QUESTION)
    with pytest.raises(ConfigError, match=r"encoded must be the result of encode\(\)"):
        dbtrimkv.video_qa.ask(*gated, encoded, QUESTION)


@pytest.mark.parametrize("options", [{"fps": 1}, 2.0, "fps=1"])
def test_options_must_be_stream_options(gated, options, clips):
    with pytest.raises(ConfigError, match="options must be a StreamOptions"):
        VideoQA(*gated, None, options)
    with pytest.raises(ConfigError, match="options must be a StreamOptions"):
        LiveSession(*gated, None, options)
    with pytest.raises(ConfigError, match="options must be a StreamOptions"):
        dbtrimkv.video_qa.encode_video(*gated, clips(2), options=options)


def test_none_options_are_the_defaults(gated):
    assert VideoQA(*gated, None, None).options == StreamOptions()
    assert LiveSession(*gated, None, None).window == gated[1].video_processor.temporal_patch_size


def test_every_refusal_is_a_dbtrimkv_error():
    assert issubclass(ConfigError, DBTrimKVError) and issubclass(MediaError, DBTrimKVError)
