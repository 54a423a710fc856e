"""The tiny offline models build, save, reload and generate with images and videos."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import random_image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from dbtrimkv.inputs.prompts import build_inputs, tokens_by_modality
from dbtrimkv.loading.tiny import SPECIAL_TOKENS, build_config, build_tiny, save_tiny


def _image_chat(image, text="What is in the image?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_architecture_matches_the_spec(tiny_vl):
    model, processor = tiny_vl
    text = model.config.text_config
    assert text.num_key_value_heads >= 2 and text.num_attention_heads > text.num_key_value_heads  # GQA
    assert len(model.config.vision_config.deepstack_visual_indexes) > 0
    assert 2 <= text.num_hidden_layers <= 6 and 64 <= text.hidden_size <= 256
    tok = processor.tokenizer
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
    assert tok.decode(tok.encode("héllo wörld 123", add_special_tokens=False)) == "héllo wörld 123"


def test_build_is_fast_and_deterministic():
    start = time.perf_counter()
    a, _ = build_tiny("qwen3_vl", seed=3)
    elapsed = time.perf_counter() - start
    b, _ = build_tiny("qwen3_vl", seed=3)
    c, _ = build_tiny("qwen3_vl", seed=4)
    assert elapsed < 10
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny variant"):
        build_config("llama")


@pytest.mark.parametrize("variant", ["qwen3_vl", "qwen3_vl_moe", "qwen3"])
def test_save_and_reload_offline(tmp_path, variant):
    save_tiny(tmp_path, variant)
    model, processor = build_tiny(variant)
    if variant == "qwen3":
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
        loaded_proc = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
        chat = "hello there"
    else:
        loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
        loaded_proc = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
        chat = _image_chat(random_image(0))
    for (name, pa), pb in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(pa, pb), name
    inputs = build_inputs(processor, chat)
    reloaded_inputs = build_inputs(loaded_proc, chat)
    assert torch.equal(inputs["input_ids"], reloaded_inputs["input_ids"])
    out_a = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out_b = loaded.eval().generate(**reloaded_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_a, out_b)
    assert out_a.shape[1] == inputs["input_ids"].shape[1] + 6


def test_generate_with_image(tiny_vl):
    model, processor = tiny_vl
    inputs = build_inputs(processor, _image_chat(random_image(2)))
    counts = tokens_by_modality(inputs, 0)
    grid = inputs["image_grid_thw"][0]
    assert counts["image"] == int(grid.prod()) // 4 and counts["video"] == 0
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_generate_with_video_frames_and_mp4(tiny_vl, video_mp4):
    model, processor = tiny_vl
    frames = [random_image(10 + i, 48, 64) for i in range(8)]
    for video in (frames, str(video_mp4)):
        chat = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Describe."}]}]
        inputs = build_inputs(processor, chat)
        counts = tokens_by_modality(inputs, 0)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert t >= 2 and counts["video"] == t * h * w // 4
        text = processor.tokenizer.decode(inputs["input_ids"][0])
        assert "seconds>" in text  # Qwen3-VL frame timestamps
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_batch_of_two_with_left_padding(tiny_vl):
    model, processor = tiny_vl
    chats = [_image_chat(random_image(3), "Hi"), _image_chat(random_image(4, 96, 128), "A much longer question here?")]
    batch = build_inputs(processor, chats)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for i, chat in enumerate(chats):
        single = build_inputs(processor, chat)
        ref = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[i, -5:], ref[0, -5:])
