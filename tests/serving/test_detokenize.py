"""The server's streaming detokenizer: pieces add up to the answer, cut before the earliest stop string."""

import random

import pytest

from dbtrimkv.serving.detokenize import TextTracker
from dbtrimkv.stop_strings import StopStrings


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
    # the whole answer, cut the way whole answers are cut (stop_strings), equals what was streamed
    _, whole = StopStrings(tok, list(stops)).cut(ids)
    assert streamed == whole
    full = tok.decode(ids)
    earliest = min((full.find(s) for s in stops if s in full), default=None)
    assert streamed == (full if earliest is None else full[:earliest])
