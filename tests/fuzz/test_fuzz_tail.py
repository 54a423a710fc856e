"""Fuzz tail (issue 27): inputs that were a bare traceback or a silent result; each is now one clear error.

Videos thinner than the aspect-ratio limit, a text-only model asked about a video, text that is not
valid Unicode, a cache used with a model it was not built for, and token ids outside the vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from cli_harness import assert_one_clear_error
from helpers import write_clip

import dbtrimkv
from dbtrimkv.errors import ConfigError, MediaError, PromptError
from dbtrimkv.inputs.media import MAX_ASPECT_RATIO, load_video


@pytest.mark.parametrize("width,height", [(804, 2), (2, 804)])
def test_video_thinner_than_the_aspect_limit(tmp_path, width, height):
    path = write_clip(tmp_path / "thin.mp4", frames=4, width=width, height=height)
    line = assert_one_clear_error(["video-qa", "--video", str(path), "which digit?", "--no-progress"])
    assert f"at most {MAX_ASPECT_RATIO}:1" in line and f"{width}x{height}" in line
    with pytest.raises(MediaError, match="aspect ratio"):
        load_video(path)


def test_video_at_the_aspect_limit_is_answered(recall_pipe, tmp_path):
    path = write_clip(tmp_path / "wide.mp4", frames=4, width=400, height=2)
    out = recall_pipe.chat("which digit?", videos=[path], max_new_tokens=1, progress=False)
    assert out.stats.prompt_tokens["video"] > 0


def test_thin_live_frames_are_refused(recall_pipe):
    from dbtrimkv.video_qa.streaming import StreamOptions, encode_windows, frame_windows

    frames = ((i, torch.zeros(2, 804, 3, dtype=torch.uint8).numpy(), 8.0) for i in range(4))
    windows = frame_windows(recall_pipe.processor, frames, StreamOptions())
    with pytest.raises(MediaError, match="aspect ratio"):
        encode_windows(recall_pipe.model, recall_pipe.processor, windows)


def test_video_qa_with_a_text_only_model(tmp_path):
    from dbtrimkv.video_qa import VideoQA

    path = write_clip(tmp_path / "v.mp4", frames=4)
    line = assert_one_clear_error(["video-qa", "--model", "tiny-text", "--video", str(path), "what?", "--no-progress"])
    assert "text-only" in line
    model, tokenizer = dbtrimkv.load_model("tiny-text")
    with pytest.raises(ConfigError, match="text-only"):
        VideoQA(model, tokenizer)


@pytest.mark.parametrize("argv", [["chat", "hi \udcff there", "--max-new-tokens", "1"],
                                  ["video-qa", "--video", "v.mp4", "what \ud800?"]])
def test_lone_surrogate_in_a_cli_argument(argv):
    line = assert_one_clear_error(argv, "not valid Unicode text")
    assert "U+DCFF" in line or "U+D800" in line


def test_lone_surrogate_in_the_python_api(recall_pipe):
    with pytest.raises(PromptError, match="not valid Unicode"):
        recall_pipe.chat("which \udcff digit?", max_new_tokens=1, progress=False)
    with pytest.raises(PromptError, match="not valid Unicode"):
        recall_pipe([{"role": "system", "content": "be \ud83d brief"}, {"role": "user", "content": "hi"}],
                    max_new_tokens=1, progress=False)
    assert recall_pipe.chat("which digit? \U0001f600", max_new_tokens=1, progress=False).stats.new_tokens == 1


@pytest.mark.parametrize("model", [None, "tiny", torch.nn.Linear(2, 2), 5])
def test_cache_on_something_that_is_not_a_gated_model(model):
    with pytest.raises(ConfigError, match="transformers model|retention gates"):
        dbtrimkv.DBTrimKVCache(model)


def test_cache_on_a_model_without_gates():
    from dbtrimkv.loading.models import load_base_model

    model, _ = load_base_model("tiny")
    with pytest.raises(ConfigError, match="no retention gates"):
        dbtrimkv.DBTrimKVCache(model)


def test_cache_built_for_another_model(recall_pipe):
    from dbtrimkv.loading.models import load_base_model

    other, _ = dbtrimkv.load_model("tiny")
    inputs = recall_pipe.build_inputs("hello")
    with pytest.raises(ConfigError, match="built for another model"):
        dbtrimkv.generate(recall_pipe.model, inputs, dbtrimkv.DBTrimKVCache(other), max_new_tokens=1)
    plain, _ = load_base_model("tiny-recall")  # the same shapes, but no gates: nothing would stage log beta
    with pytest.raises(ConfigError, match="no retention gates"):
        dbtrimkv.generate(plain, inputs, recall_pipe.new_cache(), max_new_tokens=1)


@pytest.mark.parametrize("value", [-1, -(2**40), "vocab", 2**40])
def test_input_ids_outside_the_vocabulary(recall_pipe, value):
    inputs = recall_pipe.build_inputs("hello")
    vocab = recall_pipe.model.get_input_embeddings().num_embeddings
    inputs["input_ids"][0, 1] = vocab if value == "vocab" else value
    with pytest.raises(ConfigError, match=rf"must lie in \[0, {vocab - 1}\]"):
        dbtrimkv.generate(recall_pipe.model, inputs, recall_pipe.new_cache(), max_new_tokens=1)
    inputs["input_ids"][0, 1] = vocab - 1  # the last id is fine
    dbtrimkv.generate(recall_pipe.model, inputs, recall_pipe.new_cache(), max_new_tokens=1)


def test_input_ids_that_are_not_integers(recall_pipe):
    inputs = recall_pipe.build_inputs("hello")
    inputs["input_ids"] = inputs["input_ids"].float()
    with pytest.raises(ConfigError, match="integer tensor"):
        dbtrimkv.generate(recall_pipe.model, inputs, recall_pipe.new_cache(), max_new_tokens=1)
