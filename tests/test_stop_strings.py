"""Stop strings end generation when they appear (not cut afterwards), one row at a time in a batch, and
the answer is cut as OpenAI and vLLM cut it: the text ends just before the stop string, the ids end with
the token that completed it.
"""

from __future__ import annotations

import pytest

from dbtrimkv import DBTrimKVPipeline
from dbtrimkv.errors import ConfigError
from dbtrimkv.runner.positions import language_model_of
from dbtrimkv.runner.text import TextTracker
from dbtrimkv.stop_strings import first_stop

MAX_NEW = 16


@pytest.fixture(scope="module")
def pipe():
    return DBTrimKVPipeline.from_pretrained("tiny", memory_size=3, policy="global", config="budget-tight")


@pytest.fixture()
def forwards(pipe):
    """How many times the language model ran (one forward per decoded token after the first)."""
    count = [0]
    handle = language_model_of(pipe.model).register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def _expected(pipe, ids: list[int], stops: list[str]) -> tuple[list[int], str]:
    """The shortest prefix of `ids` whose text holds a stop string, and the text before the earliest one
    (worked out by brute force)."""
    for k in range(1, len(ids) + 1):
        text = pipe.tokenizer.decode(ids[:k], skip_special_tokens=True)
        found = [text.find(stop) for stop in stops if stop in text]
        if found:
            return ids[:k], text[: min(found)]
    raise AssertionError(f"none of {stops!r} is in the answer")


def _stop_in_the_middle(pipe, out) -> str:
    """A stop string that completes inside `out`'s answer, not at its start: the text of its first token
    from the 5th on that decodes to plain ASCII (the random tiny model also makes byte pieces)."""
    assert len(out.token_ids) == MAX_NEW, "the tiny model is expected to run to max_new_tokens"
    pieces = [pipe.tokenizer.decode([t]).strip() for t in out.token_ids[4:]]
    stop = next(p for p in pieces if p and p.isascii() and p.isprintable())
    assert out.text.find(stop) >= 1
    return stop


def test_generation_stops_at_the_stop_string(pipe, forwards):
    chat = _chat("Describe the weather today.")
    free = pipe(chat, max_new_tokens=MAX_NEW, progress=False)
    free_forwards = forwards[0]
    stop = _stop_in_the_middle(pipe, free)
    ids, text = _expected(pipe, free.token_ids, [stop])
    assert len(ids) < MAX_NEW
    forwards[0] = 0
    out = pipe(chat, max_new_tokens=MAX_NEW, progress=False, stop=[stop, "never appears here"])
    assert out.text == text == free.text[: free.text.find(stop)] and stop not in out.text
    assert out.token_ids == ids and out.stats.new_tokens == len(ids)
    assert free_forwards - forwards[0] == MAX_NEW - len(ids)  # the tokens after the stop were never decoded
    assert pipe(chat, max_new_tokens=MAX_NEW, progress=False, stop=stop).text == text  # one string alone


def test_each_row_of_a_batch_stops_at_its_own_step(pipe, forwards):
    """Each row holds a stop string at another step: each is cut where its own text holds one, and the batch
    stops decoding once its last row is done."""
    chats = [_chat("Describe the weather today."), _chat("Name three colours."), _chat("Count to five.")]
    free = pipe(chats, max_new_tokens=MAX_NEW, progress=False)
    free_forwards = forwards[0]
    stops = [_stop_in_the_middle(pipe, out) for out in free]
    expected = [_expected(pipe, out.token_ids, stops) for out in free]
    assert len({len(ids) for ids, _ in expected}) > 1, "the rows should stop at different steps"
    forwards[0] = 0
    batch = pipe(chats, max_new_tokens=MAX_NEW, progress=False, stop=stops)
    assert [(out.token_ids, out.text) for out in batch] == expected
    assert [out.stats.new_tokens for out in batch] == [len(ids) for ids, _ in expected]
    assert free_forwards - forwards[0] == MAX_NEW - max(len(ids) for ids, _ in expected)


def _cut(tokenizer, ids: list[int], stops) -> tuple[list[int], str]:
    """What a decode row whose `done` is a TextTracker keeps: its ids as they grow, until the text holds a stop."""
    tracker = TextTracker(tokenizer, stops)
    for k in range(1, len(ids) + 1):
        if tracker.done(ids[:k]):
            return ids[:k], tracker.text
    tracker.flush()
    return ids, tracker.text


def test_cut_spans_tokens_and_ends_inside_a_token(pipe):
    tokenizer = pipe.tokenizer
    ids = tokenizer.encode("The answer is 42.\nNext question follows", add_special_tokens=False)
    cut_ids, text = _cut(tokenizer, ids, ["\nNext q", "question"])
    assert text == "The answer is 42."  # the earliest of the two, not included
    assert "\nNext q" in tokenizer.decode(cut_ids) and "\nNext q" not in tokenizer.decode(cut_ids[:-1])
    assert _cut(tokenizer, ids, ["4"])[1] == "The answer is "  # a stop that ends inside a token
    assert _cut(tokenizer, ids, ["zebra"]) == (ids, tokenizer.decode(ids))
    assert first_stop("abcabc", ["c", "b"]) == 1 and first_stop("abc", ["x"]) is None


@pytest.mark.parametrize("stop", [5, [""], ["ok", None], {"a": 1}])
def test_bad_stop_strings_are_one_clear_error(pipe, stop):
    with pytest.raises(ConfigError, match="stop must be a non-empty string or a list of non-empty strings"):
        pipe(_chat("hi"), max_new_tokens=2, progress=False, stop=stop)


def test_stop_strings_with_streaming(pipe, forwards):
    """Streamed with `stop`: the pieces add up to the answer not streamed (cut before the stop string), no
    piece holds the stop string, and decoding ended where it appeared."""
    chat = _chat("Describe the weather today.")
    free = pipe(chat, max_new_tokens=MAX_NEW, progress=False)
    stop = _stop_in_the_middle(pipe, free)
    whole = pipe(chat, max_new_tokens=MAX_NEW, progress=False, stop=stop)
    forwards[0] = 0
    streamed = pipe(chat, max_new_tokens=MAX_NEW, progress=False, stream=True, stop=[stop, "never appears here"])
    pieces = list(streamed)
    assert "".join(pieces) == streamed.text == whole.text and all(stop not in p for p in pieces)
    assert streamed.stats.new_tokens == whole.stats.new_tokens < MAX_NEW
    assert forwards[0] < MAX_NEW
    assert "".join(pipe(chat, max_new_tokens=MAX_NEW, progress=False, stream=True)) == free.text
