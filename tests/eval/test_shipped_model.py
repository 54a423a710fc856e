"""The shipped default `tiny-recall`: trained model + trained gates, and it solves its task."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dbtrimkv
from dbtrimkv.loading.checkpoints import default_eviction_config, gates_are_trained
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.demos.examples import example_images
from dbtrimkv.errors import ModelLoadError
from dbtrimkv.eval.harness import answer
from dbtrimkv.recall.tasks import ImageRecallTask, RecallTask, VideoRecallTask, examples, prompt_inputs


@pytest.fixture(scope="module")
def shipped():
    return dbtrimkv.load_model()  # no name: the default


def test_default_is_the_shipped_recall_model_with_trained_gates(shipped):
    model, processor = shipped
    assert gates_are_trained(model)
    assert model.config.model_type == "qwen3_vl" and model.config.text_config.hidden_size == 128
    eviction = default_eviction_config(model)  # chat / demo without budget options
    assert (eviction.memory_size, eviction.policy) == (32, "global")
    named, _ = dbtrimkv.load_model("tiny-recall")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), named.state_dict().values()))


def test_default_answers_generated_prompts_with_a_full_cache(shipped):
    """A fixed set of held-out prompts of the benchmark's default shapes (card streams, single images and
    8-frame clips), answered through the engine."""
    model, processor = shipped
    prompts = examples("cards", range(24), RecallTask(num_cards=8, filler=32, distractors=1))
    prompts += examples("image", range(8), ImageRecallTask(filler=0))
    prompts += examples("video", range(8), VideoRecallTask(frames=8, filler=32))
    wrong = []
    for example in prompts:
        predicted, _ = answer(model, processor, prompt_inputs(processor, [example]), DBTrimKVConfig(prefill_chunk=32))
        if predicted != example.answer:
            wrong.append((example.seed, example.answer_modality, example.answer, predicted))
    assert len(wrong) <= 1, wrong  # >= 97.5%


def test_chat_about_an_example_image_answers_its_digit():
    """The README's main command: the default model, a shipped example image, a plain question."""
    path, digit = example_images()[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "chat", "which digit is in the image?",
                             "--image", str(path), "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"image:{digit}"
    assert "policy global, budget 192 entries" in result.stderr  # M=32 x 3 layers x 2 KV heads


def test_every_example_image_is_answered_within_the_default_budget():
    from dbtrimkv.pipeline import DBTrimKVPipeline

    pipe = DBTrimKVPipeline.from_pretrained()  # M=32: 192 of the ~300 entries of a full cache
    for path, digit in example_images():
        assert pipe.chat("which digit is in the image?", images=[path], max_new_tokens=8).text == f"image:{digit}"


def test_a_missing_shipped_model_is_one_clear_error(monkeypatch, tmp_path):
    from dbtrimkv.loading import models as loading

    monkeypatch.setitem(loading.SHIPPED_MODELS, "tiny-recall", tmp_path / "gone")
    with pytest.raises(ModelLoadError, match="shipped model 'tiny-recall' is missing.*reinstall"):
        dbtrimkv.load_model()
