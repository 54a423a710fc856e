"""DBTrimKVPipeline: answers with stats, streaming, batches, multi-turn conversations, the HF task."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import random_image

import dbtrimkv
from dbtrimkv.errors import ConfigError, MediaError
from dbtrimkv.pipeline import DBTrimKVPipeline
from dbtrimkv.inputs.prompts import tokens_by_modality


@pytest.fixture(scope="module")
def pipe():
    return DBTrimKVPipeline.from_pretrained("tiny", memory_size=3, policy="global", config="budget-tight")


def test_from_pretrained_settings():
    p = DBTrimKVPipeline.from_pretrained("tiny", budget=50, policy="head", config="budget-long-video")
    assert p.config.budget == 50 and p.config.memory_size is None and p.config.policy == "head"
    assert p.config.prefill_chunk == 1024  # from the preset
    cfg = dbtrimkv.DBTrimKVConfig(memory_size=7, buffer_size=3)
    p2 = DBTrimKVPipeline(p.model, p.processor, cfg)
    assert p2.new_cache().budget == 7 * 3 * 2


def test_answer_and_stats(pipe, video_mp4):
    image = random_image(3)
    out = pipe.chat("What is in the image and the clip?", images=[image], videos=[str(video_mp4)], max_new_tokens=12)
    assert isinstance(out.text, str) and out.stats.new_tokens == len(out.token_ids) <= 12
    inputs = pipe.build_inputs(dbtrimkv.pipeline.user_message("What is in the image and the clip?", [image],
                                                             [str(video_mp4)]))
    assert out.stats.prompt_tokens == tokens_by_modality(inputs, 0)
    assert out.stats.prompt_tokens["image"] > 0 and out.stats.prompt_tokens["video"] > 0
    s = out.stats
    cache_lh = 3 * 2
    seen = sum(s.prompt_tokens.values()) + s.new_tokens - 1
    assert s.kv_entries_full == seen * cache_lh
    assert s.kv_entries == sum(s.retained_entries.values())
    assert s.budget == 3 * cache_lh and s.kv_entries <= s.budget + cache_lh * 32
    assert s.kv_bytes == s.kv_entries * 2 * 16 * 4 and s.kv_bytes_full == s.kv_entries_full * 2 * 16 * 4
    assert s.evictions >= 1 and s.prefill_seconds > 0 and s.decode_seconds > 0 and s.tokens_per_second > 0
    assert "KV cache:" in s.summary() and "video" in s.summary()


def test_stream_yields_the_same_text(pipe):
    image = random_image(4)
    full = pipe.chat("Describe.", images=[image], max_new_tokens=10)
    streamed = pipe.chat("Describe.", images=[image], max_new_tokens=10, stream=True)
    pieces = list(streamed)
    assert "".join(pieces) == streamed.text == full.text
    assert streamed.stats.new_tokens == full.stats.new_tokens


def test_batch_equals_single_runs(pipe):
    chats = [dbtrimkv.pipeline.user_message("Hi", [random_image(5)]),
             dbtrimkv.pipeline.user_message("A longer question about this picture?", [random_image(6, 96, 128)])]
    batch = pipe(chats, max_new_tokens=8)
    assert isinstance(batch, list) and len(batch) == 2
    for chat, out in zip(chats, batch):
        single = pipe(chat, max_new_tokens=8)
        assert out.token_ids == single.token_ids
        assert out.stats.prompt_tokens == single.stats.prompt_tokens


def test_conversation_keeps_a_bounded_cache(pipe):
    conv = pipe.conversation(system="Be brief.")
    storage, columns = [], []
    for turn in range(5):
        conv.send(f"Turn {turn}: what now?", images=[random_image(turn)] if turn % 2 == 0 else [],
                  max_new_tokens=6)
        storage.append(conv.cache.storage_bytes())
        columns.append(conv.cache.get_seq_length())
    assert conv.turns == 5 and len(conv.messages) == 11
    assert storage[-1] == storage[2]  # memory stays bounded however long the conversation runs
    bound = conv.cache.budget + conv.cache.segments_per_sequence * max(32, 1024)
    assert max(conv.cache.peak_entries) <= bound
    ids = conv.cache.known_tokens(1, torch.device("cpu"))[0][0].tolist()
    text = pipe.tokenizer.decode(ids)
    assert text.count("<|im_start|>user") == 5 and text.count("<|im_start|>system") == 1
    assert "<|im_end|>\n<|im_start|>user" in text
    # each turn only adds its own tokens: no re-prefill of the history
    assert all(b - a < 200 for a, b in zip(columns, columns[1:]))


def test_bad_media_is_a_clear_error(pipe, tmp_path):
    with pytest.raises(MediaError, match="image not found"):
        pipe.chat("?", images=[str(tmp_path / "missing.png")])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(MediaError, match="cannot read video"):
        pipe.chat("?", videos=[str(bad)])


def test_transformers_pipeline_task(tmp_path):
    model, processor = dbtrimkv.load_model("tiny")
    hf = transformers.pipeline("dbtrimkv-image-text-to-text", model=model, processor=processor,
                               eviction="budget-tight")
    chat = dbtrimkv.pipeline.user_message("What?", [random_image(1)])
    result = hf(chat, max_new_tokens=3)  # like transformers' image-text-to-text: a list of dicts per chat
    assert isinstance(result, list) and len(result) == 1
    assert set(result[0]) == {"input_text", "generated_text", "stats"} and result[0]["input_text"] == chat
    assert result[0]["stats"]["prompt_tokens"]["image"] > 0 and isinstance(result[0]["generated_text"], str)
    assert hf.dbtrimkv.config.memory_size == 128
    with pytest.raises(ConfigError, match="stream=True"):  # a task returns whole answers; the message says where to stream
        hf(chat, max_new_tokens=3, stream=True)
    from dbtrimkv.loading.tiny import save_tiny

    save_tiny(tmp_path / "m", "qwen3_vl")
    with pytest.warns(UserWarning, match="untrained"):
        by_name = transformers.pipeline("dbtrimkv-image-text-to-text", model=str(tmp_path / "m"))
    batch = by_name(["hi", "there"], max_new_tokens=2)
    assert [len(r) for r in batch] == [1, 1] and [r[0]["input_text"] for r in batch] == ["hi", "there"]
    assert isinstance(by_name("hi", max_new_tokens=1), list)
