"""Fuzz: bad command-line flags of every subcommand give one `dbtrimkv: error:` line, before any model loads."""

from __future__ import annotations

import socket

import pytest
from cli_harness import assert_one_clear_error

import dbtrimkv.loading.checkpoints
import dbtrimkv.eval.harness
import dbtrimkv.loading.models


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(dbtrimkv.loading.checkpoints, "load_model", refuse)
    monkeypatch.setattr(dbtrimkv.loading.models, "load_base_model", refuse)
    monkeypatch.setattr(dbtrimkv.eval.harness, "run_benchmark", refuse)


BAD_NUMBERS = ["abc", "", "nan", "inf", "-inf", "1e999"]
MODEL_FLAGS = [["--device", d] for d in ("meta", "gpu", "cuda:x", "", "cuda0")]
EVICTION_FLAGS = (
    [["--budget", v] for v in ("0", "-5", "abc", "1.5", "99999999999")]
    + [["--memory-size", v] for v in ("0", "-1", "99999999999", "x")]
    + [["--buffer-size", v] for v in ("-1", "100000000", "1e9", "nan")]
    + [["--prefill-chunk", v] for v in ("0", "-3", "10000000")]
    + [["--threshold", v] for v in ("0", "1.5", "-0.2", "nan", "inf")]
    + [["--policy", "threshold"], ["--policy", "lru"], ["--budget", "8", "--memory-size", "2"],
       ["--policy", "global", "--threshold", "0.5"], ["--config", "no-such-preset"]]
)
CHAT_FLAGS = (
    [["--max-new-tokens", v] for v in ("0", "-1", "2000000", *BAD_NUMBERS)]
    + [["--sample", "--temperature", v] for v in ("0", "-1", "1000", *BAD_NUMBERS)]
    + [["--sample", "--top-p", v] for v in ("0", "2", "-0.1", "1.0001", *BAD_NUMBERS)]
    + [["--video-fps", v] for v in ("-1", "nan", "inf", "abc")]
    + [["--video-max-frames", v] for v in ("0", "-2", "1.5", "1000000")]
)
VIDEO_QA_FLAGS = (
    [["--fps", v] for v in ("-1", "nan", "inf", "abc")]
    + [["--max-frames", v] for v in ("0", "-1", "x")]
    + [["--window-frames", v] for v in ("0", "100000")]
    + [["--frame-tokens", v] for v in ("0", "100000")]
    + [["--limit", v] for v in ("0", "-1")]
    + [["--max-new-tokens", v] for v in ("0", "-1")]
)
DEMO_FLAGS = (
    [["--port", v] for v in ("-1", "0", "70000", "abc", "")]
    + [["--max-upload-mb", v] for v in ("0", "-1", "nan")]
    + [["--queue-size", v] for v in ("0", "-1")]
    + [["--max-new-tokens", v] for v in ("0", "x")]
    + [["--host", "no such host!!"]]
)
SYNTHETIC_FLAGS = (
    [["--examples", v] for v in ("0", "-1")]
    + [["--needle", v] for v in ("2", "-0.5", "nan")]
    + [["--budgets", v] for v in ("0", "2", "nan", "-0.1")]
    + [["--policies", "threshold"], ["--policies", "nope"], ["--threshold", "0.5"], ["--threshold", "0"]]
    + [["--image-size", "0"], ["--num-cards", "0"], ["--frames", "0"], ["--filler", "-1"],
       ["--prefill-chunk", "0"], ["--buffer-size", "-1"], ["--distractors", "-2"]]
)

CASES = (
    [("chat", ["chat", *flags, "q?"]) for flags in CHAT_FLAGS + EVICTION_FLAGS + MODEL_FLAGS]
    + [("video-qa", ["video-qa", "--video", "x.mp4", *flags, "q?"]) for flags in VIDEO_QA_FLAGS + EVICTION_FLAGS[:8]]
    + [("demo", ["demo", *flags]) for flags in DEMO_FLAGS + EVICTION_FLAGS[8:14]]
    + [("eval", ["eval", "synthetic", *flags]) for flags in SYNTHETIC_FLAGS]
    + [("eval", ["eval", "train-recall", *flags]) for flags in (["--steps", "0"], ["--threads", "0"], ["--device", "tpu"])]
    + [("train", ["train", "--config", "missing-config.yaml"])]
)


@pytest.mark.parametrize("argv", [argv for _, argv in CASES], ids=[" ".join(argv)[:60] for _, argv in CASES])
def test_bad_flag_is_one_clear_error_before_loading(argv):
    assert_one_clear_error(argv)


def test_missing_cuda_is_reported_before_loading():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_clear_error(["chat", "--device", "cuda", "q?"], "CUDA is not available")


def test_port_in_use_names_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = assert_one_clear_error(["demo", "--port", str(port)])
    assert "--port" in line and str(port) in line


def test_flag_messages_name_the_flag():
    assert "--max-new-tokens" in assert_one_clear_error(["chat", "--max-new-tokens", "0", "q"])
    assert "--top-p" in assert_one_clear_error(["chat", "--sample", "--top-p", "2", "q"])
    assert "threshold tau" in assert_one_clear_error(["chat", "--policy", "threshold", "q"])
    assert "buffer" in assert_one_clear_error(["chat", "--buffer-size", "100000000", "q"])


def test_number_of_cases():
    assert len(CASES) >= 120
