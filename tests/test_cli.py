"""`dbtrimkv chat` end to end in a subprocess, and its bad-input errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dbtrimkv.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


def test_chat_on_a_generated_png(image_png):
    result = run_cli("chat", "--image", str(image_png), "--max-new-tokens", "5", "What is this?")
    assert result.returncode == 0, result.stderr
    assert "default model is tiny-recall" in result.stderr  # the toy default says what it is, on one line
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


def test_chat_reports_the_kv_budget(image_png):
    result = run_cli("chat", "--image", str(image_png), "--memory-size", "2", "--buffer-size", "2",
                     "--prefill-chunk", "8", "--policy", "head", "--max-new-tokens", "6", "What?")
    assert result.returncode == 0, result.stderr
    kv = next(line for line in result.stderr.splitlines() if line.startswith("KV cache:"))
    assert "budget 12 entries" in kv and "policy head" in kv and "kept by modality" in kv
    kept, full = map(int, re.match(r"KV cache: (\d+) entries kept of (\d+)", kv).groups())
    assert kept <= 12 + 6 * 8 < full


def test_interactive_multi_turn(image_png):
    script = f"Hello there\n/image {image_png}\nWhat is in the image?\n/stats\n/image /no/such.png\nand?\n/exit\n"
    result = run_cli("chat", "--max-new-tokens", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3  # the bad path is refused at /image, so "and?" is answered
    assert "image not found" in result.stderr and "nothing attached" in result.stderr  # reported; the chat goes on
    assert "KV cache:" in result.stderr and "image 0, video" not in result.stderr.split("KV cache:")[1].split("\n")[0]


def test_help_lists_the_options():
    result = run_cli("chat", "--help")
    for option in ("--image", "--video", "--model", "--max-new-tokens", "--device", "--dtype", "--budget",
                   "--memory-size", "--policy", "--config", "--prefill-chunk", "--full-cache"):
        assert option in result.stdout
