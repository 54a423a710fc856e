"""Live sessions: frames pushed over time, questions at any moment from a fork of the cache, flat memory.

The shipped tiny-recall answers the recall task's 8-frame clips (99% of held-out ones with a full
cache; 12 of the first 12 through a live session at its default memory size): the tests use
held-out clips and check the answer's digit (not a text-free proxy).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from dbtrimkv.recall.tasks import VIDEO_QUESTION, VideoRecallTask, draw_shape, video_example
from dbtrimkv.video_qa.live import LiveSession
from dbtrimkv.video_qa.sources import stream_frames

CLIP = VideoRecallTask(frames=8, filler=0)  # 2 fps: 4 s
ANSWERED = {2: ("1", 0), 0: ("6", 3)}  # seed -> (digit, first digit frame) of clips the shipped model answers live


@pytest.fixture(scope="module")
def shipped():
    import dbtrimkv

    return dbtrimkv.load_model()


def clip_frames(seed: int) -> list[np.ndarray]:
    example = video_example(seed, CLIP)
    assert (example.answer, example.cards[0].frame) == ANSWERED[seed]
    return [np.asarray(frame) for frame in example.messages[0]["content"][0]["video"]]


def write_lossless(path, frames: list[np.ndarray], fps: int = 2):
    """A .mov with PNG-coded frames (lossless: the 32-pixel digit glyph survives)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("seed", sorted(ANSWERED))
def test_a_question_after_the_digit_frame_gets_the_digit(shipped, seed):
    model, processor = shipped
    session = LiveSession(model, processor, max_new_tokens=8)
    for index, frame in enumerate(clip_frames(seed)):
        session.push(index, frame, 2.0)
    before = session.memory()
    answer = session.ask(VIDEO_QUESTION)
    assert answer.text == f"video:{ANSWERED[seed][0]}"
    assert answer.stream_seconds == 3.5 and answer.frames == 8  # the last frame it saw, 7 / 2 fps
    assert session.memory() == before  # asking forks: the session's cache is untouched
    assert session.ask(VIDEO_QUESTION).text == answer.text  # several questions per session


def test_questions_see_only_the_frames_seen_so_far_and_the_stream_goes_on(shipped):
    model, processor = shipped
    session = LiveSession(model, processor, max_new_tokens=8)
    frames = clip_frames(0)
    for index, frame in enumerate(frames[:3]):  # the digit is on frames 3-5: not there yet
        session.push(index, frame, 2.0)
    early = session.ask(VIDEO_QUESTION)
    assert (early.frames, early.stream_seconds) == (2, 0.5)  # frame 2 waits for its group partner
    assert session.memory()["pending_frames"] == 1
    for index, frame in enumerate(frames[3:], start=3):
        session.push(index, frame, 2.0)
    assert session.ask(VIDEO_QUESTION).text == "video:6"


def test_memory_is_identical_after_one_and_ten_times_the_stream(shipped):
    model, processor = shipped
    session = LiveSession(model, processor, max_new_tokens=4)
    rng = random.Random(0)
    frames = (np.asarray(draw_shape(32, rng)) for _ in range(200))
    for index in range(20):
        session.push(index, next(frames), 2.0)
    once = session.memory()
    for index in range(20, 200):
        session.push(index, next(frames), 2.0)
    after = session.memory()
    assert session.frames == 200 and session.cache.num_evictions > 10
    # the KV storage and the peak are identical; the entries cached right now move in a saw-tooth between
    # the budget (after an eviction) and the eviction bound, whatever the stream's length
    assert (after["kv_bytes"], after["peak_entries"], after["pending_frames"]) == (
        once["kv_bytes"], once["peak_entries"], once["pending_frames"])
    bound = session.cache.budget + session.cache.segments_per_sequence * session.cache.config.buffer_size
    assert all(session.cache.budget <= m["entries"] <= bound for m in (once, after))


def test_stream_frames_reads_files_paced_at_real_time_and_urls_by_presentation_time(tmp_path):
    from dbtrimkv.errors import MediaError

    frames = [np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(6)]
    path = write_lossless(tmp_path / "clip.mov", frames)
    fast = list(stream_frames(str(path), fps=2.0))
    assert [i for i, _, _ in fast] == list(range(6)) and all(np.array_equal(a, b) for (_, a, _), b in zip(fast, frames))
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    paced = list(stream_frames(str(path), fps=2.0, realtime=True, clock=lambda: now[0], sleep=sleep))
    assert len(paced) == 6 and slept == [0.5] * 5  # each frame waits for its time (0, 0.5, 1.0, ...)
    url = list(stream_frames(f"file:{path}", fps=1.0))  # the PyAV path of devices and network streams
    assert [(i, fps) for i, _, fps in url] == [(0, 1000.0), (1000, 1000.0), (2000, 1000.0)]  # ms clock, 1 fps
    with pytest.raises(MediaError, match="cannot open video source"):
        list(stream_frames(f"file:{tmp_path / 'missing.mov'}"))


def test_watch_answers_stdin_questions_with_the_stream_time(shipped, tmp_path, monkeypatch, capsys):
    from dbtrimkv.cli import main

    path = write_lossless(tmp_path / "clip.mov", clip_frames(2))
    monkeypatch.setattr("sys.stdin", io.StringIO(f"@3 {VIDEO_QUESTION}\n\n{VIDEO_QUESTION}\n"))
    assert main(["watch", str(path), "--fps", "2", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[t=3.5s] video:1", "[t=3.5s] video:1"]
    assert "watched 8 frames (3.5 s)" in err


def test_watch_rejects_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    from dbtrimkv.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("@soon which digit?\n"))
    assert main(["watch", str(tmp_path / "nothing.mov"), "--fps", "0"]) == 2
    assert "--fps must be > 0" in capsys.readouterr().err
    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 2
    path = write_lossless(tmp_path / "clip.mov", frames)
    assert main(["watch", str(path)]) == 0  # a mistyped line is reported; the live session goes on (issue 27)
    err = capsys.readouterr().err
    assert "needs a time in seconds" in err and "the session goes on" in err and "Traceback" not in err
