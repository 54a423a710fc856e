"""Training data: response-only loss mask, truncation, bad files, packing, the synthetic generator."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from training_helpers import gated_model

from dbtrimkv.errors import ConfigError
from dbtrimkv.inputs.prompts import tokenizer_of
from dbtrimkv.training.collate import Collator, pack_examples
from dbtrimkv.training.data import ChatDataset, encode_example, read_chats
from dbtrimkv.training.objective import GateDistiller
from dbtrimkv.training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def gated_vl():
    return gated_model("tiny")


@pytest.fixture(scope="module")
def gated_text():
    return gated_model("tiny-text")


def test_only_assistant_turns_are_trained_on(gated_vl, image_chats):
    _, processor = gated_vl
    chat = next(c for c in read_chats(image_chats) if len(c) == 4)  # two user and two assistant turns
    example = encode_example(processor, chat, max_length=512)
    tokenizer = tokenizer_of(processor)
    predicted = example["targets"][example["loss_mask"]]
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert tokenizer.decode(predicted) == "".join(f"{r}<|im_end|>" for r in replies)
    assert example["mm_token_type_ids"].sum() > 0 and example["image_grid_thw"].shape == (1, 3)


def test_long_examples_are_truncated_or_replaced(gated_vl, tmp_path, caplog):
    _, processor = gated_vl
    image = str(write_synthetic_dataset(tmp_path, 1).parent / "images" / "0000.png")
    long_text = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 200}]
    late_image = [{"role": "user", "content": [{"type": "text", "text": "z" * 80}, {"type": "image", "image": image}]},
                  {"role": "assistant", "content": "ok"}]
    dataset = ChatDataset([late_image, long_text], processor, max_length=64, source="mem")
    with caplog.at_level(logging.WARNING, logger="dbtrimkv.training.data"):
        first = dataset[0]  # the image sits past token 64: replaced by the next example
        assert torch.equal(first["input_ids"], dataset[1]["input_ids"])
    assert len(first["input_ids"]) == 64 and first["loss_mask"].sum() > 0
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "example 1 skipped: its images/videos reach token" in messages
    assert "example 2 has" in messages and "truncated to max_length=64" in messages
    with pytest.raises(ConfigError, match="no example fits max_length=64"):
        ChatDataset([late_image], processor, max_length=64).usable_examples()


@pytest.mark.parametrize("content, message", [
    ('{"messages": []}', "non-empty 'messages' list"),
    ("{not json", "not valid JSON"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text(good + "\n" + content + "\n")
    with pytest.raises(ConfigError, match=f"bad.jsonl:2: .*{message}"):
        read_chats(path)


def test_a_missing_image_names_the_example(gated_vl, tmp_path):
    _, processor = gated_vl
    path = tmp_path / "data.jsonl"
    chat = [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
            {"role": "assistant", "content": "b"}]
    path.write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(ConfigError, match="example 1: .*nope.png"):
        ChatDataset(read_chats(path), processor, 64, source=str(path))[0]


def test_synthetic_data_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 6, seed=1)
    b = write_synthetic_dataset(tmp_path / "b", 6, seed=1)
    c = write_synthetic_dataset(tmp_path / "c", 6, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for png in sorted((tmp_path / "a" / "images").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()
    assert len(a.read_text().splitlines()) == 6


@pytest.mark.parametrize("mode", ["head", "global"])
def test_packed_rows_give_the_same_losses_as_separate_rows(gated_text, text_chats, mode):
    model, tokenizer = gated_text
    examples = ChatDataset(read_chats(text_chats), tokenizer, max_length=256).usable_examples()[:6]
    packed = pack_examples(examples, max_length=256)
    assert len(packed) < len(examples)  # sequences really share rows
    distiller = GateDistiller(model, memory_size=4, capacity_mode=mode)
    with torch.no_grad():
        separate = distiller(Collator(tokenizer.pad_token_id)(examples))
        together = distiller(Collator(tokenizer.pad_token_id, packed=True)(packed))
    for name in ("kl", "ntp", "capacity", "mass_ratio"):
        assert separate[name] > 0
        torch.testing.assert_close(together[name], separate[name], rtol=1e-4, atol=1e-6)


def test_media_paths_are_relative_to_the_jsonl_file(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    path.parent.mkdir()
    content = [{"type": "image", "image": "a.png"}, {"type": "video", "video": ["f0.png", "/abs/f1.png"]},
               {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "a.png"}]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": content}]}) + "\n")
    parts = read_chats(path)[0][0]["content"]
    base = str(path.parent)
    assert parts[0]["image"] == f"{base}/a.png" and parts[2]["video"] == f"{base}/clip.mp4"
    assert parts[1]["video"] == [f"{base}/f0.png", "/abs/f1.png"] and parts[3]["text"] == "a.png"
