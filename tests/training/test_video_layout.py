"""Training recipes pin how videos are laid out in their chats, so that they give the same batches, and
so the same weights, on every supported transformers release (this file runs in CI on the oldest and the
newest): transformers 5.25 dropped the outer `<|vision_start|>`...`<|vision_end|>` pair around a video
that the tiny-recall model and its gates were trained with."""

from __future__ import annotations

import hashlib

import pytest

from dbtrimkv.errors import ConfigError
from dbtrimkv.inputs.prompts import VideoOptions, build_inputs
from dbtrimkv.loading.tiny import build_processor
from dbtrimkv.modeling.transformers_compat import VIDEO_WRAPPER_COLLAPSED, lay_out_videos
from dbtrimkv.recall.recall_model import load_recipe, recipe_video
from dbtrimkv.recall.tasks import ImageRecallTask, RecallTask, VideoRecallTask, image_example, recall_example, \
    video_example
from dbtrimkv.recall.train_model import collate
from dbtrimkv.training.train_config import TrainConfig

# sha256 of a training batch's input ids, token types, mask and supervised positions, recorded under
# transformers 5.17 (the layout the shipped model and gates were trained with)
WRAPPED_BATCH_SHA256 = "eda5e54e2e86066adb739b8a78b935baa97cd82ecd973733f5180d92c50045f5"


def _batch():
    return [video_example(3), video_example(11, VideoRecallTask(frames=24)), recall_example(5, RecallTask()),
            image_example(7, ImageRecallTask(filler=4))]


def _digest(inputs, targets) -> str:
    digest = hashlib.sha256()
    for key in ("input_ids", "mm_token_type_ids", "attention_mask"):
        digest.update(inputs[key].numpy().tobytes())
    digest.update(repr(sorted(targets)).encode())
    return digest.hexdigest()


def test_a_wrapped_batch_is_the_same_on_every_release():
    inputs, targets = collate(build_processor(), _batch(), VideoOptions(layout="wrapped"))
    assert _digest(inputs, targets) == WRAPPED_BATCH_SHA256


def test_the_installed_layout_is_the_releases_own():
    processor = build_processor()
    video = [video_example(3).messages]
    wrapped = build_inputs(processor, video, add_generation_prompt=False, video=VideoOptions(layout="wrapped"))
    installed = build_inputs(processor, video, add_generation_prompt=False)
    wrapped_ids, installed_ids = wrapped["input_ids"][0].tolist(), installed["input_ids"][0].tolist()
    if not VIDEO_WRAPPER_COLLAPSED:  # <= 5.24 writes the pair itself
        assert wrapped_ids == installed_ids
        return
    start, end = processor.tokenizer.convert_tokens_to_ids([processor.vision_start_token, processor.vision_end_token])
    first = wrapped_ids.index(start)  # the outer pair: the video's first vision start, its last vision end
    last = len(wrapped_ids) - 1 - wrapped_ids[::-1].index(end)
    assert wrapped_ids[first + 1] != start  # a timestamp follows the outer start, then the first group's start
    assert wrapped_ids[:first] + wrapped_ids[first + 1 : last] + wrapped_ids[last + 1 :] == installed_ids
    assert (wrapped["pixel_values_videos"] == installed["pixel_values_videos"]).all()


def test_text_without_videos_is_left_alone():
    processor = build_processor()
    for layout in ("installed", "wrapped"):
        assert lay_out_videos("<|im_start|>user\nhello<|im_end|>", processor, layout) == \
            "<|im_start|>user\nhello<|im_end|>"
    with pytest.raises(ValueError, match="video layout must be one of installed, wrapped"):
        lay_out_videos("text", processor, "collapsed")


def test_the_shipped_recipes_pin_the_wrapped_layout():
    for recipe in ("recall-tiny", "recall-tiny-clips"):
        assert recipe_video(load_recipe(recipe)).layout == "wrapped"
    for config in ("train-recall-gates", "train-recall-gates-long", "train-recall-gates-stage3"):
        assert TrainConfig.load(config).video_layout == "wrapped"
    assert recipe_video({}).layout == "installed"  # a recipe that says nothing: the installed release's


def test_a_bad_layout_is_one_config_error():
    with pytest.raises(ConfigError, match="video_layout must be one of installed, wrapped, got 'collapsed'"):
        recipe_video({"video_layout": "collapsed"})
    with pytest.raises(ConfigError, match="video_layout must be one of installed, wrapped, got 'old'"):
        TrainConfig(synthetic_examples=1, video_layout="old")
