"""The server's rows stop where the pipeline's rows stop, and say why: one rule (`runner.decode.DecodeRow`).

A stop token ends both with "stop" (the token is the last id, not text), `max_tokens` ends both with
"length", a stop string ends both with "stop" after the token that completed it (text cut before it).
"""

from __future__ import annotations

import queue

import pytest
import torch

from dbtrimkv.runner.decode import DecodeRow
from dbtrimkv.runner.sampling import Sampler, SamplingParams
from dbtrimkv.serving.engine import Engine, EngineRequest
from dbtrimkv.inputs.turns import stop_token_ids

CHAT = [{"role": "user", "content": "Remember the code 4417. What is the code?"}]


@pytest.fixture(scope="module")
def served(recall_pipeline):
    pipe = recall_pipeline
    engine = Engine(pipe.model, pipe.processor, pipe.config, kv_memory=64 * 2**20, max_running=4)
    engine.start()
    yield pipe, engine
    engine.stop()


def serve(engine: Engine, pipe, max_tokens: int, stop=()) -> tuple[list[int], str, str]:
    """(generated ids, streamed text, finish reason) of one greedy request to the engine."""
    events: queue.Queue = queue.Queue()
    request = EngineRequest(f"f-{max_tokens}-{stop}", pipe.build_inputs(CHAT), pipe.config,
                            SamplingParams(max_tokens=max_tokens, temperature=0, stop=tuple(stop)), events.put)
    engine.submit(request)
    text = ""
    while (event := events.get(timeout=60)).kind == "token":
        text += event.text
    assert event.kind == "done", event.error
    return list(request.generated), text, event.finish_reason


def test_stop_token_length_and_stop_string_agree_with_the_pipeline(served):
    pipe, engine = served
    stop = stop_token_ids(pipe.model, pipe.tokenizer)
    whole = pipe(CHAT, max_new_tokens=64, progress=False)
    assert whole.token_ids[-1] in stop and len(whole.token_ids) >= 3  # the answer ends at a stop token

    ids, text, reason = serve(engine, pipe, 64)
    assert (ids, text, reason) == (whole.token_ids, whole.text, "stop")

    short = pipe(CHAT, max_new_tokens=2, progress=False)
    ids, text, reason = serve(engine, pipe, 2)
    assert (ids, text, reason) == (short.token_ids, short.text, "length")
    assert ids == whole.token_ids[:2]

    cut = whole.text.strip()[1:3]  # a stop string inside the answer
    assert cut and cut in whole.text
    until = pipe(CHAT, max_new_tokens=64, progress=False, stop=cut)
    ids, text, reason = serve(engine, pipe, 64, stop=[cut])
    assert (ids, text, reason) == (until.token_ids, until.text, "stop")
    assert len(ids) < len(whole.token_ids) and text == whole.text[: whole.text.index(cut)]


def test_a_decode_row_says_why_it_is_done():
    row = lambda **kw: DecodeRow(Sampler(SamplingParams(max_tokens=9, temperature=0)), frozenset({7}), **kw)
    assert [row().record(t, 3) for t in (7,)] == ["stop"]
    length = row()
    assert [length.record(t, 3) for t in (1, 2, 3)] == [None, None, "length"]
    both = row(done=lambda ids: ids[-1] == 3)  # a stop string completed by the last allowed token: "stop"
    assert [both.record(t, 3) for t in (1, 2, 3)] == [None, None, "stop"]
    early = row(min_new_tokens=2)  # no stop token before min_new_tokens
    logits = torch.zeros(10)
    logits[7] = 5.0
    assert [early.accept(logits, 9) for _ in range(3)] == [0, 0, 7] and early.reason == "stop"
