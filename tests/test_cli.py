"""`dbtrimkv chat` end to end in a subprocess, and its bad-input errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dbtrimkv.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_chat_on_a_generated_png(image_png):
    result = run_cli("chat", "--image", str(image_png), "--max-new-tokens", "5", "What is this?")
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr  # the tiny default says so, on one line
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt tokens:")]
    assert len(stats) == 1 and "image" in stats[0] and "new tokens: 5" in stats[0]
    assert "Traceback" not in result.stderr


def test_chat_on_a_video_file(video_mp4):
    result = run_cli("chat", "--video", str(video_mp4), "--max-new-tokens", "3", "What happens?")
    assert result.returncode == 0, result.stderr
    assert "video 0)" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "MISSING.png"], "image not found"),
        (["--image", "CORRUPT.png"], "cannot read image"),
        (["--video", "CORRUPT.mp4"], "cannot read video"),
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "no-such-org/no-such-model"], "cannot find model"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    corrupt_png = tmp_path / "CORRUPT.png"
    corrupt_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (tmp_path / "CORRUPT.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(64))
    args = [str(tmp_path / a) if a.isupper() or a.startswith(("MISSING", "CORRUPT")) else a for a in args]
    result = run_cli("chat", *args, "question?")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("dbtrimkv: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_options():
    result = run_cli("chat", "--help")
    for option in ("--image", "--video", "--model", "--max-new-tokens", "--device", "--dtype"):
        assert option in result.stdout
