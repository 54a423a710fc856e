"""The recall generator: deterministic by seed, and its gold answer is what the prompt's cards say."""

from __future__ import annotations

import numpy as np
import pytest

from dbtrimkv.recall.tasks import (
    DIGIT_HOLD, DIGITS, IMAGE_QUESTION, KEYS, SEGMENTS, ImageRecallTask, RecallTask, VideoRecallTask, answer_prefix, image_example,
    question_text, recall_example, segment_rects, video_example,
)


def read_digit(image, box) -> str:
    """Read a seven-segment digit back from its pixels: a segment is lit where its centre has the glyph colour."""
    pixels = np.asarray(image).astype(int)
    background = pixels[0, 0]
    thickness = max(2, image.width // 10)
    lit = set()
    for name, (x0, y0, x1, y1) in segment_rects(box, thickness).items():
        # sample the middle of the segment, away from the corners it shares with its neighbours
        x, y = (x0 + x1) // 2, (y0 + y1) // 2
        if np.abs(pixels[y, x] - background).sum() > 0:
            lit.add(name)
    matches = [d for d, segments in SEGMENTS.items() if set(segments) == lit]
    assert len(matches) == 1, lit
    return matches[0]


def prompt_text(example) -> str:
    """The text parts of the user turns, with images shown as `[img]`."""
    return "".join(part.get("text", "[img]") for m in example.messages if m["role"] == "user" for part in m["content"])


def image_bytes(example) -> list[bytes]:
    return [part["image"].tobytes() for m in example.messages for part in m["content"] if part["type"] == "image"]


def test_same_seed_same_example_and_different_seeds_differ():
    a, b = recall_example(7), recall_example(7)
    assert prompt_text(a) == prompt_text(b) and image_bytes(a) == image_bytes(b) and a.answers == b.answers
    c = recall_example(8)
    assert prompt_text(c) != prompt_text(a)
    v1, v2 = video_example(3), video_example(3)
    frames = lambda v: [f.tobytes() for f in v.messages[0]["content"][1]["video"]]  # noqa: E731
    assert frames(v1) == frames(v2) and v1.answer == v2.answer
    assert frames(video_example(4)) != frames(v1)


@pytest.mark.parametrize("seed", range(40))
def test_gold_answer_is_recoverable_from_the_cards(seed):
    task = RecallTask(num_cards=1 + seed % 12, filler=seed % 50, distractors=seed % 3, questions=1)
    ex = recall_example(seed, task)
    keys = [card.key for card in ex.cards]
    assert len(set(keys)) == len(keys) == task.num_cards and set(keys) <= set(KEYS)
    needle = ex.cards[ex.queried[-1]]
    assert ex.answer == needle.value and ex.answer in DIGITS and len(ex.answer) == 1
    text = prompt_text(ex)
    assert text.endswith(question_text(needle.key))
    assert ex.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": answer_prefix(needle.key)}]}
    body = text[: -len(question_text(needle.key))]
    for card in ex.cards:  # each card reads `K` then its value, as text or as a glyph image
        assert body.count(card.key) == 1
        if card.modality == "text":
            assert f"{card.key}{card.value}" in body and card.image is None
        else:
            assert f"{card.key}[img]" in body and read_digit(card.image, card.box) == card.value
    # nothing else in the prompt names a key or a digit: filler is lower-case, distractors are shapes
    assert sum(ch.isupper() for ch in body) == task.num_cards
    assert sum(ch.isdigit() for ch in body) == sum(c.modality == "text" for c in ex.cards)
    n_images = len(image_bytes(ex))
    assert n_images == sum(c.modality == "image" for c in ex.cards) + task.distractors * (task.num_cards + 1)


def test_parameters_place_the_needle_and_its_modality():
    for modality in ("image", "text"):
        for needle, index in ((0.0, 0), (1.0, 9), (0.5, 4)):  # round(0.5 * 9) = 4 (banker's rounding)
            ex = recall_example(11, RecallTask(num_cards=10, needle=needle, answer_modality=modality))
            assert ex.queried == [index] and ex.cards[index].modality == modality
    images = [p["image"] for p in recall_example(2, RecallTask(image_size=64)).messages[0]["content"]
              if p["type"] == "image"]
    assert images and all(im.size == (64, 64) for im in images)
    with pytest.raises(ValueError):
        RecallTask(num_cards=27)
    with pytest.raises(ValueError):
        RecallTask(answer_modality="audio")


def test_multi_question_chats_answer_every_question():
    ex = recall_example(5, RecallTask(num_cards=6, questions=4))
    assert len(ex.answers) == len(ex.queried) == 4
    users = [m for m in ex.messages if m["role"] == "user"]
    assistants = [m for m in ex.messages if m["role"] == "assistant"]
    keys = [ex.cards[i].key for i in ex.queried]
    assert [a["content"][0]["text"] for a in assistants] == [f"{k}{v}" for k, v in zip(keys, ex.answers[:-1])] + [
        keys[-1]]
    for message, key in zip(users, keys):
        assert message["content"][-1]["text"] == question_text(key)
    for index, answer in zip(ex.queried, ex.answers):
        assert ex.cards[index].value == answer
    last = {"role": "assistant", "content": [{"type": "text", "text": f"{keys[-1]}{ex.answer}"}]}
    assert ex.training_messages()[-1] == last


@pytest.mark.parametrize("seed", range(10))
def test_image_variant_is_one_digit_image_and_its_question(seed):
    ex, again = image_example(seed, ImageRecallTask(filler=seed * 4)), image_example(seed, ImageRecallTask(filler=seed * 4))
    assert again.answers == ex.answers and image_bytes(again) == image_bytes(ex) and prompt_text(again) == prompt_text(ex)
    images = [p["image"] for p in ex.messages[0]["content"] if p["type"] == "image"]
    assert len(images) == 1 and read_digit(images[0], ex.cards[0].box) == ex.answer
    assert ex.answer_modality == "image" and ex.fixed_answer_prefix
    assert ex.messages[-1]["content"][0]["text"] == "image:" and ex.training_messages()[-1]["content"][0]["text"] == (
        "image:" + ex.answer)
    parts = ex.messages[0]["content"]
    if seed == 0:  # no filler: exactly what `dbtrimkv chat QUESTION --image PNG` sends
        assert [p["type"] for p in parts] == ["image", "text"] and parts[1]["text"] == IMAGE_QUESTION
    else:
        assert parts[-1]["text"] == IMAGE_QUESTION and len(prompt_text(ex)) > seed * 4


def test_example_images_are_the_generated_ones():
    """The committed example PNGs are the image variant at the seeds they claim."""
    from dbtrimkv.demos.examples import IMAGE_SEEDS, IMAGE_TASK, example_images
    from dbtrimkv.inputs.media import load_image

    assert len(example_images()) == len(IMAGE_SEEDS) == 3
    for (path, answer), seed in zip(example_images(), IMAGE_SEEDS):
        generated = image_example(seed, IMAGE_TASK)
        assert generated.answer == answer
        assert load_image(path).tobytes() == generated.messages[0]["content"][0]["image"].tobytes()


@pytest.mark.parametrize("seed", range(10))
def test_video_holds_the_digit_for_three_consecutive_frames(seed):
    ex = video_example(seed, VideoRecallTask(frames=6 + seed))
    frames = ex.messages[0]["content"][1]["video"]
    assert len(frames) == 6 + seed and DIGIT_HOLD == 3
    needle = ex.cards[0].frame
    assert 0 <= needle <= len(frames) - 3
    assert read_digit(frames[needle], ex.cards[0].box) == ex.answer and ex.answer_modality == "video"
    held = [i for i, frame in enumerate(frames) if frame.tobytes() == frames[needle].tobytes()]
    assert held == [needle, needle + 1, needle + 2]  # one still image, then distractors again
    # three consecutive frames always hold a whole 2-frame group (Qwen3-VL's temporal patch), whatever the phase
    assert any(i % 2 == 0 and i + 1 in held for i in held)
    placed = video_example(seed, VideoRecallTask(frames=9, needle=1.0))
    assert placed.cards[0].frame == 6
    single = video_example(seed, VideoRecallTask(frames=9, needle=1.0, hold=1))
    assert single.cards[0].frame == 8
    with pytest.raises(ValueError, match="hold"):
        VideoRecallTask(frames=4, hold=5)


@pytest.mark.parametrize("seed", range(8))
def test_recalls_repeat_earlier_cards_and_change_nothing_else(seed):
    task = RecallTask(num_cards=2 + seed, filler=seed * 3, distractors=seed % 2)
    plain, recalled = recall_example(seed, task), recall_example(seed, RecallTask(**{**task.__dict__, "recalls": 6}))
    assert plain.answers == recalled.answers and [c.value for c in plain.cards] == [c.value for c in recalled.cards]
    text = prompt_text(recalled)
    position = {card.key: text.index(card.key) for card in recalled.cards}
    mentions = [(text.index(f"{k}{v} ", start), k, v) for k, v, start in _recall_mentions(text, recalled)]
    assert len(mentions) == 6
    for at, key, value in mentions:  # each recall names an earlier card and its true value, as text
        assert at > position[key] and value == next(c.value for c in recalled.cards if c.key == key)
    assert prompt_text(plain) == _without_recalls(text)


def _recall_mentions(text, example):
    """(key, value, start) of every `Kd ` written after the card K itself."""
    import re

    first = {card.key: text.index(card.key) for card in example.cards}
    return [(m.group(1), m.group(2), m.start()) for m in re.finditer(r"([A-Z])([0-9]) ", text)
            if m.start() > first[m.group(1)]]


def _without_recalls(text):
    """`text` with every mention `Kd ` of an already seen key K cut out."""
    import re

    seen, out, last = set(), [], 0
    for m in re.finditer(r"([A-Z])([0-9] )?", text):
        if m.group(1) in seen and m.group(2):
            out.append(text[last : m.start()])
            last = m.end()
        seen.add(m.group(1))
    return "".join(out) + text[last:]
