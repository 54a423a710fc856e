"""The retention timeline: per layer and token, the KV heads still holding it, drawn with modalities and times."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dbtrimkv.reporting import retention_timeline as rt
from dbtrimkv.inputs.modality import Modality
from dbtrimkv.recall.tasks import VideoRecallTask, video_example


@pytest.fixture(scope="module")
def pipe():
    from dbtrimkv.pipeline import DBTrimKVPipeline

    return DBTrimKVPipeline.from_pretrained()  # the shipped tiny-recall, its default budget (M=32)


@pytest.fixture(scope="module")
def video_chat(pipe):
    frames = video_example(3, VideoRecallTask(frames=16, filler=0)).messages[0]["content"][0]["video"]
    return pipe.chat("which digit is in the video?", videos=[frames], max_new_tokens=4)


def test_counts_are_the_caches_retained_positions_per_layer(pipe, video_chat):
    cache = video_chat.cache
    ids = rt.conversation_tokens(cache)
    timeline = rt.build(cache, ids, pipe.tokenizer, cache.image_token_id, cache.video_token_id)
    assert timeline.heads.shape == (cache.num_layers, ids.numel()) and timeline.num_kv_heads == cache.num_kv_heads
    for layer, heads in enumerate(cache.retained_positions()):
        expected = np.zeros(ids.numel(), dtype=np.int64)
        for kept in heads:
            expected[kept.numpy()] += 1
        assert np.array_equal(timeline.heads[layer], expected)
    assert timeline.heads.sum() == cache.num_entries() < cache.full_cache_entries()  # some were evicted


def test_video_tokens_are_marked_and_each_frame_group_carries_its_time(pipe, video_chat):
    cache = video_chat.cache
    ids = rt.conversation_tokens(cache)
    timeline = rt.build(cache, ids, pipe.tokenizer, cache.image_token_id, cache.video_token_id)
    video = timeline.kinds == Modality.VIDEO
    assert video.sum() == video_chat.stats.prompt_tokens["video"] == 8  # 16 frames, 2 per group, 1 token each
    times = [seconds for _, seconds in timeline.stamps]
    assert len(times) == 8 and times == sorted(times) and times[1] - times[0] == pytest.approx(1.0)  # 2 fps
    assert all(video[token] for token, _ in timeline.stamps)


def test_binning_keeps_a_single_kept_token_visible():
    heads = np.zeros((3, 10_000), dtype=np.int64)
    heads[1, 7_777] = 2
    kinds = np.zeros(10_000, dtype=np.int8)
    kinds[5_000] = Modality.VIDEO
    binned, bin_kinds, edges = rt.binned(rt.Timeline(heads, kinds, [], 2), max_columns=100)
    assert binned.shape == (3, 100) and binned[1].max() == 2 and binned.sum() == 2 and edges[-1] == 10_000
    assert bin_kinds.tolist().count(Modality.VIDEO) == 1
    small, _, _ = rt.binned(rt.Timeline(heads[:, :50], kinds[:50], [], 2), max_columns=100)
    assert small.shape == (3, 50)  # short conversations: one column per token


def test_plot_writes_a_png(tmp_path, pipe, video_chat):
    path = rt.save(video_chat.cache, rt.conversation_tokens(video_chat.cache), pipe.tokenizer, tmp_path / "t.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 800


def test_chat_and_video_qa_write_the_plot(tmp_path, capsys):
    from dbtrimkv.cli import main

    assert main(["chat", "which digit is in the image?", "--image", "demos/examples/digit-911.png",
                 "--retention-plot", str(tmp_path / "chat.png")]) == 0
    assert capsys.readouterr().out.strip() == "image:7"
    assert Image.open(tmp_path / "chat.png").format == "PNG"
    import av

    frames = video_example(2, VideoRecallTask(frames=8, filler=0)).messages[0]["content"][0]["video"]
    with av.open(str(tmp_path / "clip.mov"), "w") as container:
        stream = container.add_stream("png", rate=2)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert main(["video-qa", "--video", str(tmp_path / "clip.mov"), "--fps", "2", "--no-progress",
                 "which digit is in the video?", "which digit?", "--retention-plot", str(tmp_path / "v.png")]) == 0
    assert "A: video:1" in capsys.readouterr().out
    for name in ("v-1.png", "v-2.png"):
        assert Image.open(tmp_path / name).format == "PNG"


def test_a_bad_plot_path_is_one_clear_error_before_loading(tmp_path, capsys):
    from dbtrimkv.cli import main

    assert main(["chat", "hi", "--model", "no/such-model", "--retention-plot", str(tmp_path / "x" / "t.png")]) == 2
    assert "folder" in capsys.readouterr().err
    assert main(["chat", "hi", "--retention-plot", str(tmp_path / "t.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
