"""`dbtrimkv demo`: its options and help, and the real command serving the page on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from demo_testing import QUEUE_SIZE, free_port

from dbtrimkv.cli import build_parser
from dbtrimkv.policies import policy_names


def parse(*args):
    return build_parser().parse_args(["demo", *args])


def test_safe_defaults():
    args = parse()
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert (args.max_upload_mb, args.max_video_seconds, args.queue_size) == (50.0, 60.0, 16)
    assert args.model is None and args.budget is None and args.policy is None


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--device", "--dtype", "--config", "--budget", "--memory-size",
                   f"--policy {{{','.join(policy_names())}}}", "--threshold", "--buffer-size", "--prefill-chunk",
                   "--full-cache", "--host", "--port", "--share", "--max-upload-mb", "--max-video-seconds",
                   "--queue-size", "--max-new-tokens"):
        assert option in text, option
    assert "default: 127.0.0.1" in text and "off by default" in text


@pytest.mark.parametrize("option, value, message", [
    ("--max-upload-mb", "0", "must be greater than 0"),
    ("--max-video-seconds", "ten", "expected a number"),
    ("--queue-size", "0", "must be at least 1"),
])
def test_bad_limits_exit_with_a_message(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(option, value)
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def _config_when_up(url: str, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dbtrimkv demo exited early:\n{proc.stderr.read()}")
        try:
            return httpx.get(f"{url}/config", timeout=5).json()
        except httpx.HTTPError:
            time.sleep(1)
    pytest.fail("dbtrimkv demo did not come up in time")


def _read_until(stream, text: str, timeout: float = 60) -> str:
    """What `stream` gives up to and including the first line holding `text` (or all it gave in `timeout`):
    the demo prints its start-up lines just after the server answers, so a fast check could stop it first."""
    lines = []

    def read():
        for line in stream:
            lines.append(line)
            if text in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return "".join(lines)


def test_command_serves_the_demo_on_loopback(tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbtrimkv.cli", "demo", "--port", str(port), "--budget", "48",
         "--max-video-seconds", "7", "--queue-size", str(QUEUE_SIZE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        config = _config_when_up(f"http://127.0.0.1:{port}", proc)
        head = _read_until(proc.stdout, "dbtrimkv demo --share")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    out = head + out
    text = json.dumps(config)
    assert "Video (at most 7 s)" in text and "tiny-recall" in text  # the default model's notice shows in the page
    assert all(f"digit-{seed}.png" in text for seed in (911, 912, 913))  # and its example images
    numbers = {c["props"]["label"].split(":")[0]: c["props"]["value"] for c in config["components"]
               if c["type"] == "number"}
    assert numbers == {"Budget": 48, "Memory size M per head (> 0 overrides": 0}
    assert f"http://127.0.0.1:{port}" in out and "tiny-recall" in err
    assert "share=True" not in out + err and "dbtrimkv demo --share" in out  # our flag, not Gradio's keyword
