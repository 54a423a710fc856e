"""How often a request's text goes to its client: every N tokens when streamed (`--stream-interval`,
vLLM's option), once at the end when not.

Why: with 16 clients streaming from the tiny model, the HTTP side's socket writes (one per SSE chunk)
and the engine-to-loop hand-offs (one per token event) held the interpreter lock about as long as the
engine's own work; fewer, larger pieces cut both. The text a client gets must not change: the same
characters, once each, in order, whatever N, across a restart too.
"""

from __future__ import annotations

import json
import queue

import httpx
import pytest
from PIL import Image
from serving_helpers import EXAMPLES, image_message, start_server

from dbtrimkv import DBTrimKVConfig, load_model
from dbtrimkv.cli import main
from dbtrimkv.errors import ConfigError
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.runner.text import TextTracker
from dbtrimkv.serving.engine import Engine, EngineRequest
from dbtrimkv.runner.sampling import SamplingParams

CONFIG = DBTrimKVConfig(memory_size=4, buffer_size=4, prefill_chunk=8)


@pytest.fixture(scope="module")
def recall_model():
    return load_model("tiny-recall")  # (random weights emit byte tokens whose pieces are mostly empty)


def _pieces(engine, processor, chat, name: str, send_every, max_tokens: int = 13):
    events: queue.Queue = queue.Queue()
    job = EngineRequest(name, build_inputs(processor, chat), CONFIG,
                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), events.put,
                        send_every=send_every)
    engine.submit(job)
    pieces = []
    while (event := events.get(timeout=60)).kind == "token":
        pieces.append(event.text)
    assert event.kind == "done", event.error
    return job, pieces


@pytest.mark.parametrize("every", [1, 3, 5, None])
def test_the_text_goes_out_every_n_tokens_the_first_at_once_and_is_the_same_text(recall_model, every):
    model, processor = recall_model
    engine = Engine(model, processor, CONFIG, kv_memory=64 * 2**20, max_running=16)
    engine.start()
    try:
        chats = [[{"role": "user", "content": [{"type": "image", "image": Image.open(EXAMPLES / name)},
                                                {"type": "text", "text": "which digit is in the image?"}]}]
                 for name in ("digit-911.png", "digit-912.png")]
        for i, chat in enumerate(chats):
            job, pieces = _pieces(engine, processor, chat, f"r{every}-{i}", every)
            reference, ref_pieces = _pieces(engine, processor, chat, f"ref{every}-{i}", 1)
            assert "".join(pieces) == job.tracker.text == reference.tracker.text != ""
            assert job.generated == reference.generated
            if every is None:  # not streamed: the whole answer in one piece at the end
                assert len(pieces) == 1
            else:  # the first token's text at once, then `every` tokens' text a piece (and the tail)
                assert len(ref_pieces) == len(reference.generated)  # these answers: one character a token
                assert pieces[0] == ref_pieces[0]
                assert pieces[1:] == ["".join(ref_pieces[k : k + every]) for k in range(1, len(ref_pieces), every)]
    finally:
        engine.stop()


def test_a_restart_sends_the_unsent_text_once(recall_model):
    """A request restarted (its batch's forward failed) with text generated but not yet sent: the
    restarted run sends that text, and nothing the client already has."""
    model, processor = recall_model
    tokenizer = processor.tokenizer
    job = EngineRequest("x", build_inputs(processor, "hello"), CONFIG, SamplingParams(max_tokens=8), lambda e: None,
                        send_every=4)
    job.tracker = TextTracker(tokenizer)
    ids = tokenizer.encode(" one two three four", add_special_tokens=False)
    sent = job.tracker.add(ids[0])  # the first piece went out
    job.unsent = "".join(job.tracker.add(t) for t in ids[1:])  # the rest waits for its interval
    job.restart()
    again = TextTracker(tokenizer)
    again.emitted = job.emitted  # what the restarted run's tracker skips (Stepper.prepare)
    resent = "".join(again.add(t) for t in ids) + again.flush()
    assert job.unsent == "" and sent + resent == tokenizer.decode(ids)


def test_streamed_chunks_over_http_follow_the_interval(recall_pipeline):
    server = start_server(recall_pipeline, kv_memory=("bytes", 4_000_000), stream_interval=4)
    try:
        body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 9, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        texts = [c["choices"][0]["delta"]["content"] for c in chunks
                 if c["choices"] and c["choices"][0]["delta"].get("content")]
        whole = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
        assert "".join(texts) == whole["choices"][0]["message"]["content"] != ""
        assert len(texts) <= 1 + 2 + 1  # the first token, then every 4 of the other 8 (a tail at most)
    finally:
        server.close()


@pytest.mark.parametrize("value", [0, -2, True, 1.5])
def test_a_bad_interval_is_one_clear_error(recall_model, value):
    with pytest.raises(ConfigError, match="--stream-interval must be a whole number of tokens >= 1"):
        Engine(*recall_model, CONFIG, kv_memory=64 * 2**20, stream_interval=value)


def test_the_flag_is_checked_before_the_model_loads(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_load)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--stream-interval", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dbtrimkv: error: argument --stream-interval: must be at least 1, got 0 (see dbtrimkv serve --help)"]
