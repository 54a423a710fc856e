"""`dbtrimkv watch` as a live tool (issue 27, item 3): the source is opened and checked before stdin is
read (and before the model loads); a bad stdin line is reported and the session goes on; times
beyond the end, questions before the first frame and empty questions are said plainly."""

from __future__ import annotations

import io
import sys
import threading
import time

import numpy as np
import pytest
from cli_harness import run_cli

from dbtrimkv.commands import watch
from dbtrimkv.errors import ConfigError, MediaError
from dbtrimkv.video_qa.sources import open_source


@pytest.mark.parametrize("source, message", [
    ("no/such/clip.mp4", "video file not found"),
    ("/dev/video97", "camera device not found"),
    ("", "the video source is empty"),
])
def test_a_missing_source_is_an_error_at_once(source, message):
    with pytest.raises(MediaError, match=message):
        open_source(source)


def test_a_directory_is_not_a_source(tmp_path):
    with pytest.raises(MediaError, match="is a directory"):
        open_source(str(tmp_path))


def test_an_unreachable_stream_is_an_error_at_once():
    start = time.monotonic()
    with pytest.raises(MediaError, match="cannot open video source rtsp://127.0.0.1:9/"):
        open_source("rtsp://127.0.0.1:9/live")  # nothing listens on port 9
    assert time.monotonic() - start < 15


def test_a_file_source_yields_its_first_frame_again(video_mp4):
    frames = list(open_source(str(video_mp4), fps=2.0))
    assert [index for index, _, _ in frames][:2] == [0, 4] and frames[0][1].ndim == 3  # 8 fps file at 2 fps


@pytest.mark.parametrize("question", ["", "which digit?"])
def test_the_command_fails_before_stdin_and_before_the_model(question, monkeypatch, no_work):
    read = []
    monkeypatch.setattr(sys, "stdin", _Recording(question + "\n", read))
    code, out, err = run_cli(["watch", "no/such/clip.mp4"])
    assert code == 2 and "video file not found: no/such/clip.mp4" in err and "Traceback" not in err
    assert out == "" and "watched 0 frames" not in err and not read  # no answer first, no "success"


@pytest.mark.parametrize("line, expected", [
    ("which digit?", (None, "which digit?")),
    ("@2 which digit?", (2.0, "which digit?")),
    ("  @0.5   what now?  ", (0.5, "what now?")),
])
def test_lines(line, expected):
    assert watch.parse_line(line) == expected


@pytest.mark.parametrize("line, message", [
    ("@abc which digit?", "needs a time in seconds"),
    ("@nan which digit?", "finite number of seconds"),
    ("@inf which digit?", "finite number of seconds"),
    ("@-3 which digit?", "finite number of seconds"),
    ("@2", "empty question"),
    ("@2    ", "empty question"),
    ("@", "needs a time in seconds"),
])
def test_bad_lines_are_refused(line, message):
    with pytest.raises(ConfigError, match=message):
        watch.parse_line(line)


def test_a_live_session_survives_bad_lines_and_says_when_the_stream_ended(video_mp4, monkeypatch):
    script = "@abc which digit?\n@2\n@nan what?\n@100 which digit?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run_cli(["watch", str(video_mp4), "--fps", "1", "--max-new-tokens", "3"])
    assert code == 0, err
    assert err.count("dbtrimkv: error:") == 3 and err.count("the session goes on") == 3
    assert "empty question in '@2'" in err
    answers = out.strip().splitlines()
    assert len(answers) == 1 and answers[0].startswith("[t=1.0s] ")  # only @100 is answered, from the end
    assert "note: the stream ended at t=1.0s, before t=100s" in err
    assert "watched 2 frames" in err


class _FakeSession:
    """What `_Watcher` and `_answer` use of a LiveSession: frames arrive from the source thread."""

    window = 2

    def __init__(self):
        self.frames, self.stream_seconds, self.asked_at = 0, 0.0, None

    def push(self, index, frame, fps):
        self.frames, self.stream_seconds = self.frames + 1, index / fps

    def flush(self):
        pass

    def ask(self, question):
        self.asked_at = self.frames
        return type("Answer", (), {"stream_seconds": self.stream_seconds, "text": "image:7"})()


def test_a_question_before_the_first_frame_waits_for_it_and_says_so(capsys):
    gate = threading.Event()

    def slow_source():
        gate.wait(5)
        yield 3, np.zeros((4, 4, 3), np.uint8), 1.0

    session = _FakeSession()
    watcher = watch._Watcher(session, slow_source())
    watcher.start()
    threading.Timer(0.3, gate.set).start()
    watch._answer(watcher, session, None, "which digit?")
    out, err = capsys.readouterr()
    assert "no frame is in the cache yet" in err and "waiting for the first ones" in err
    assert session.asked_at == 1 and out == "[t=3.0s] image:7\n"  # answered from the frame, not from nothing


class _Recording(io.StringIO):
    """stdin that records whether it was read."""

    def __init__(self, text, read):
        super().__init__(text)
        self.read_log = read

    def __iter__(self):
        self.read_log.append(True)
        return super().__iter__()

    def readline(self, *args):
        self.read_log.append(True)
        return super().readline(*args)
