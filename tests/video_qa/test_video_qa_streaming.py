"""Streaming a video window by window: exact at full budget, bounded under a budget, encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dbtrimkv
from dbtrimkv.generation import prefill
from dbtrimkv.inputs.media import Video, iter_video_frames
from dbtrimkv.inputs.prompts import build_inputs, tokenizer_of
from dbtrimkv.video_qa import StreamOptions, ask, encode_video, frame_size, prompt_parts, text_inputs, video_windows
from dbtrimkv.video_qa import streaming

QUESTION = "What happens in the clip?"
OPTIONS = StreamOptions(fps=8, window_frames=4)  # the clips are 8 fps: every frame is sampled


def _whole_video_inputs(processor, path):
    """The same frames (resized to the fixed size) as one video, through the ordinary prompt builder."""
    frames, indices, fps = [], [], 0.0
    for index, frame, fps in iter_video_frames(path, fps=OPTIONS.fps):
        frames.append(frame)
        indices.append(index)
    height, width = frame_size(processor, *frames[0].shape[:2])
    resized = np.stack([streaming._resize(f, (height, width)) for f in frames])
    video = Video(resized, fps=fps, frames_indices=indices, total_num_frames=len(indices))
    chat = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": QUESTION}]}]
    return build_inputs(processor, chat)


def test_windows_at_full_budget_match_one_shot_processing(gated, clips):
    model, processor = gated
    path = clips(11)  # windows of 4, 4 and 3 frames: the last one is padded like the whole video's end
    whole = _whole_video_inputs(processor, path)
    with torch.no_grad():
        one_shot = model(**whole).logits[:, -1]

    prefix, suffix = prompt_parts(processor, QUESTION)
    windows = list(video_windows(processor, path, OPTIONS))
    assert [len(w.frames_indices) for w in windows] == [4, 4, 3]
    head, tail = text_inputs(processor, prefix, True), text_inputs(processor, suffix, False)
    streamed = [head, *(w.inputs for w in windows), tail]
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(torch.cat([part[key] for part in streamed], 1), whole[key])
    # timestamps are absolute: the 2nd window starts with frames 4 and 5 of 8 fps -> (0.5 + 0.625) / 2 s
    assert tokenizer_of(processor).decode(windows[1].inputs["input_ids"][0]).startswith("<0.6 seconds>")
    assert torch.equal(torch.cat([w.inputs["pixel_values_videos"] for w in windows]), whole["pixel_values_videos"])
    assert all(w.inputs["video_grid_thw"][0, 1:].tolist() == [4, 4] for w in windows)  # one frame size throughout

    encoded = encode_video(model, processor, path, dbtrimkv.DBTrimKVConfig(prefill_chunk=16), OPTIONS)
    logits = prefill(model, tail, encoded.cache.clone())
    assert (logits - one_shot).abs().max().item() <= 1e-4
    assert encoded.cache.evicted_entries == 0
    assert encoded.frames == 11 and encoded.frame_groups == 6
    assert sum(encoded.prompt_tokens.values()) == whole["input_ids"].shape[1] - tail["input_ids"].shape[1]


def test_frame_size_does_not_depend_on_the_window_length():
    from dbtrimkv.loading.tiny import build_processor

    processor = build_processor()  # patch 16 x merge 2: sides are multiples of 32
    # why it must be fixed: left to itself, the video processor shrinks frames as a clip gets longer
    grids = [processor.video_processor(videos=[np.zeros((n, 128, 128, 3), np.uint8)], do_sample_frames=False,
                                       return_tensors="pt")["video_grid_thw"][0, 1:].tolist() for n in (2, 16)]
    assert grids[0] != grids[1]
    assert frame_size(processor, 48, 64) == (64, 64)
    assert frame_size(processor, 48, 64, frame_tokens=1) == (32, 32)
    height, width = frame_size(processor, 720, 1280, frame_tokens=128)
    assert height % 32 == width % 32 == 0 and (height // 32) * (width // 32) <= 128 and width > height


def test_frames_are_decoded_one_window_at_a_time(gated, clips, monkeypatch):
    _, processor = gated
    decoded = []

    def counting(*args, **kwargs):
        for item in iter_video_frames(*args, **kwargs):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(streaming, "iter_video_frames", counting)
    windows = video_windows(processor, clips(16), OPTIONS)
    first = next(windows)
    assert len(first.frames_indices) == 4 and len(decoded) == 4  # nothing decoded beyond the window
    assert sum(len(w.frames_indices) for w in windows) == 12 and len(decoded) == 16


def test_doubling_the_video_leaves_peak_entries_and_storage_unchanged(gated, clips):
    model, processor = gated
    config = dbtrimkv.DBTrimKVConfig(budget=60, buffer_size=4, prefill_chunk=8)
    layers_x_heads = 3 * 2
    bound = 60 + layers_x_heads * 8
    measured = {}
    for frames in (16, 32):
        encoded = encode_video(model, processor, clips(frames), config, OPTIONS)
        cache = encoded.cache
        assert encoded.frames == frames and cache.num_evictions > 0
        answer = ask(model, processor, encoded, QUESTION, max_new_tokens=3)
        measured[frames] = (max(cache.peak_entries), cache.storage_bytes(), cache.full_cache_entries(0),
                            answer.stats.peak_kv_entries, answer.stats.kv_storage_bytes)
    short, long = measured[16], measured[32]
    assert long[2] > 1.8 * short[2]  # twice the video went through ...
    assert short[0] == long[0] == bound  # ... and the peak is the same bound
    assert short[1] == long[1] == bound * 2 * 16 * 4  # K + V, head_dim 16, fp32
    assert short[3:] == long[3:] == (bound, short[1])


def test_questions_reuse_the_encoded_video(gated, clips):
    model, processor = gated
    groups_per_call = []
    hook = model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: groups_per_call.append(int(kwargs["grid_thw"].shape[0])), with_kwargs=True)
    try:
        config = dbtrimkv.DBTrimKVConfig(budget=60, prefill_chunk=8)
        encoded = encode_video(model, processor, clips(11), config, OPTIONS, progress=True)
        assert sum(groups_per_call) == encoded.frame_groups == 6  # each frame group encoded once
        assert max(groups_per_call) <= OPTIONS.window_frames // 2  # never more than one window of pixels
        seen, entries = list(encoded.cache.seen), encoded.cache.num_entries(0)
        first = ask(model, processor, encoded, QUESTION, max_new_tokens=4)
        second = ask(model, processor, encoded, "Is there a dog?", max_new_tokens=4)
        again = ask(model, processor, encoded, QUESTION, max_new_tokens=4)
    finally:
        hook.remove()
    assert sum(groups_per_call) == 6  # the questions did not touch the vision tower
    assert encoded.cache.seen == seen and encoded.cache.num_entries(0) == entries  # forks left it as it was
    assert again.text == first.text and first.stats.new_tokens >= 1 and second.stats.new_tokens >= 1
    assert first.stats.prompt_tokens["video"] == encoded.prompt_tokens["video"] > 0


def test_stream_options_are_checked():
    with pytest.raises(dbtrimkv.errors.ConfigError, match="window_frames"):
        StreamOptions(window_frames=0)
    with pytest.raises(dbtrimkv.errors.ConfigError, match="fps"):
        StreamOptions(fps=-1)


def test_no_config_means_the_library_budget_not_a_full_cache(gated, clips):
    model, processor = gated
    encoded = encode_video(model, processor, clips(2), options=OPTIONS)
    assert encoded.cache.budget == 3 * 2 * 512  # configs/default.yaml: memory_size 512 per (layer, KV head)
