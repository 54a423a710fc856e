"""A row's text (`runner.text.TextTracker`, the server's pieces and the pipeline's answers and streams):
pieces add up to the answer, cut before the earliest stop string."""

import random

import pytest

from dbtrimkv.runner.text import TextTracker


class CharTokenizer:
    """One token per piece of text (pieces of 1-3 characters), so stop strings span and split tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def stream(tracker, ids):
    out = []
    for i in ids:
        out.append(tracker.add(i))
        if tracker.stopped:
            break
    out.append(tracker.flush())
    return out


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    tok = CharTokenizer(["ab", "c", "EN", "D", "xy", "E"])
    tracker = TextTracker(tok, stop=("END",))
    pieces = stream(tracker, [0, 1, 5, 2, 3, 4])  # "ab" "c" "E" "EN" "D" "xy" -> "abcEEND..."
    assert "".join(pieces) == "abcE"
    assert tracker.stopped and tracker.text == "abcE"
    assert all("EN" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(20))
def test_pieces_equal_the_whole_answer_cut(seed):
    rng = random.Random(seed)
    alphabet = "abxy"
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(12)]
    tok = CharTokenizer(pieces)
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 3))) for _ in range(2)})
    ids = [rng.randrange(len(pieces)) for _ in range(30)]
    tracker = TextTracker(tok, stop=stops)
    streamed = "".join(stream(tracker, ids))
    # the whole answer, cut before its earliest stop string, equals what was streamed; the tracker used as a
    # decode row's `done` (the ids given all at once, as a row's generated ids grow) cuts it the same way
    full = tok.decode(ids)
    earliest = min((full.find(s) for s in stops if s in full), default=None)
    assert streamed == (full if earliest is None else full[:earliest])
    row = TextTracker(tok, stop=stops)
    stopped_at = next((k for k in range(1, len(ids) + 1) if row.done(ids[:k])), None)
    assert row.text == streamed and (stopped_at is None) == (earliest is None)
    if stopped_at is not None:  # the shortest prefix whose text holds a stop string
        assert any(s in tok.decode(ids[:stopped_at]) for s in stops)
        assert not any(s in tok.decode(ids[:stopped_at - 1]) for s in stops)


def byte_level_tokenizer():
    """A small byte-level BPE (Qwen's kind) trained here, so multi-byte characters split over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "naïve café über straße", "数字 是 七", "emoji 🙂 and 🚀 fly", "<|end|>"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.mark.parametrize("name", ["byte-level", "tiny", "tiny-recall"])
def test_incremental_text_equals_decoding_all_ids(name):
    """Each token decodes a window of the last ids, not the whole answer; the pieces still add up to
    the whole answer's decoded text for random ids (multi-byte characters split over tokens, special
    tokens skipped), and no piece holds a half character."""
    if name == "byte-level":
        tok = byte_level_tokenizer()
    else:
        from dbtrimkv import load_model

        tok = load_model(name)[1].tokenizer
    rng = random.Random(0)
    calls = []
    real = tok.decode

    def counted(ids, **kwargs):
        calls.append(len(ids))
        return real(ids, **kwargs)

    tok.decode = counted
    for trial in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]
        calls.clear()
        tracker = TextTracker(tok)
        pieces = stream(tracker, ids)
        whole = real(ids, skip_special_tokens=True)
        assert "".join(pieces) == tracker.text == whole, (trial, ids)
        assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in whole
        assert max(calls) < max(8, len(ids) // 2) or len(ids) < 16  # windows, not the whole answer


def test_a_tracker_follows_one_row():
    """A `TextTracker` is one row's `done`: ids that do not continue its own are refused, not mixed in."""
    tok = CharTokenizer(["a", "b", "c"])
    tracker = TextTracker(tok, stop=("cc",))
    assert not tracker.done([0, 1]) and tracker.text == "ab"
    assert not tracker.done([0, 1])  # the same ids again: nothing new
    with pytest.raises(ValueError, match="one row"):
        tracker.done([2, 2])  # another row's ids
    with pytest.raises(ValueError, match="one row"):
        tracker.done([0])  # fewer ids than it has seen


def test_generate_takes_one_done_per_row():
    import torch

    from dbtrimkv import DBTrimKVCache, generate, load_model
    from dbtrimkv.errors import ConfigError
    from dbtrimkv.inputs.prompts import build_inputs

    model, processor = load_model("tiny")
    chats = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in ("hi", "hello there")]
    inputs = build_inputs(processor, chats)
    with pytest.raises(ConfigError, match="one per row"):
        generate(model, inputs, DBTrimKVCache(model), max_new_tokens=4, done=[lambda ids: False])
    stops = [lambda ids: len(ids) == 2, lambda ids: len(ids) == 3]  # row b stops after b + 2 tokens
    out = generate(model, inputs, DBTrimKVCache(model), max_new_tokens=6, min_new_tokens=6, done=stops)
    assert isinstance(out, torch.Tensor) and out.shape[1] == 3
