"""Fault isolation: a failure while serving one request of a running batch fails that request alone.

Each test injects a failure into one row of a batch (its sampler, its image's vision tower, its
detokenizer, or the batched forward itself, halfway through the layers) and checks that the other
requests get exactly the tokens they get alone, that the streamed text is sent once, and that every
slot returns to the pool.
"""

from __future__ import annotations

import queue
import sys
import time

import pytest
import torch

from dbtrimkv import DBTrimKVConfig, load_model
from dbtrimkv.modeling.model_anatomy import text_decoder_layers
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.serving import stepper as stepper_module
from dbtrimkv.runner.text import TextTracker
from dbtrimkv.serving.engine import Engine, EngineRequest
from dbtrimkv.runner.sampling import Sampler, SamplingParams
from helpers import random_image, randomize_gates

CONFIG = DBTrimKVConfig(memory_size=4, buffer_size=4, prefill_chunk=8)
BAD_SEED = 666  # marks the request whose sampler / detokenizer fails


@pytest.fixture(scope="module")
def random_vl():
    model, processor = load_model("tiny")
    randomize_gates(model, seed=3)
    return model, processor


@pytest.fixture(scope="module")
def engine(random_vl):
    engine = Engine(*random_vl, CONFIG, kv_memory=64 * 2**20, max_running=16)
    engine.start()
    yield engine
    engine.stop()


def prompts(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        content = [{"type": "text", "text": "tell me about it " * (1 + i % 3)}]
        if i % 2 == 0:
            content.insert(0, {"type": "image", "image": random_image(i, 32 + 16 * (i % 3), 48)})
        out.append([{"role": "user", "content": content}])
    return out


def submit(engine, processor, prompt, name: str, seed: int | None = None, max_tokens: int = 12):
    events: queue.Queue = queue.Queue()
    job = EngineRequest(name, build_inputs(processor, prompt), CONFIG,
                        SamplingParams(max_tokens=max_tokens, temperature=0, seed=seed, ignore_eos=True), events.put)
    engine.submit(job)
    return job, events


def outcome(job, events) -> tuple[str, list[int] | int]:
    """("done", tokens) once the request ends (its streamed text checked against its answer), or ("error", status)."""
    pieces = []
    while (event := events.get(timeout=60)).kind == "token":
        pieces.append(event.text)
    if event.kind == "error":
        return "error", event.error.status
    assert "".join(pieces) == job.tracker.text  # each piece sent once, even across a restart
    return "done", job.generated


def alone(engine, processor, items) -> list[list[int]]:
    return [outcome(*submit(engine, processor, p, f"alone-{i}-{id(p)}"))[1] for i, p in enumerate(items)]


def together_with_one_bad(engine, processor, items, bad_prompt, bad_seed=None):
    """Submits the items with a bad prompt among them; they join in one step (the engine waits on the
    scheduler's lock until all are in), so their prompts' first chunks run in one forward."""
    with engine.cond:
        jobs = [submit(engine, processor, p, f"ok-{i}-{id(p)}") for i, p in enumerate(items[:3])]
        jobs.append(submit(engine, processor, bad_prompt, f"bad-{id(bad_prompt)}", seed=bad_seed))
        jobs += [submit(engine, processor, p, f"ok-{i}-{id(p)}") for i, p in enumerate(items[3:], 3)]
    results = [outcome(*j) for j in jobs]
    bad = results.pop(3)
    return bad, [tokens for kind, tokens in results], results


def assert_pool_all_back(engine):
    assert not engine.running and not engine.waiting
    assert engine.pool.num_free == engine.pool.capacity == engine.admission.pool_slots
    assert engine.admission.reserved == 0 and engine.admission.views_reserved() == 0


def test_a_sampler_failure_fails_its_request_alone(engine, random_vl, monkeypatch):
    processor = random_vl[1]
    items = prompts(6)
    expected = alone(engine, processor, items)
    real = Sampler.__call__

    def failing(self, logits):
        if self.params.seed == BAD_SEED and len(getattr(self, "_calls", [])) >= 2:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        self.__dict__.setdefault("_calls", []).append(1)
        return real(self, logits)

    monkeypatch.setattr(Sampler, "__call__", failing)
    bad, tokens, results = together_with_one_bad(engine, processor, items, prompts(1)[0], bad_seed=BAD_SEED)
    assert bad == ("error", 500)
    assert all(kind == "done" for kind, _ in results) and tokens == expected
    assert_pool_all_back(engine)


def test_a_detokenizer_failure_fails_its_request_alone(engine, random_vl, monkeypatch):
    processor = random_vl[1]
    items = prompts(5)
    expected = alone(engine, processor, items)
    real = TextTracker.add

    def failing(self, token):
        if self.stop == ("<bad>",) and len(self.ids) >= 3:
            raise ValueError("the tokenizer cannot decode this")
        return real(self, token)

    monkeypatch.setattr(TextTracker, "add", failing)
    jobs = [submit(engine, processor, p, f"d{i}") for i, p in enumerate(items)]
    events: queue.Queue = queue.Queue()
    bad = EngineRequest("d-bad", build_inputs(processor, items[0]), CONFIG,
                        SamplingParams(max_tokens=12, temperature=0, stop=("<bad>",), ignore_eos=True), events.put)
    engine.submit(bad)
    assert [outcome(*j) for j in jobs] == [("done", t) for t in expected]
    assert outcome(bad, events) == ("error", 500)
    assert_pool_all_back(engine)


def test_a_vision_tower_failure_on_one_image_fails_its_request_alone(engine, random_vl, monkeypatch):
    processor = random_vl[1]
    items = prompts(6)
    expected = alone(engine, processor, items)
    bad_prompt = [{"role": "user", "content": [{"type": "image", "image": random_image(99, 96, 160)},
                                               {"type": "text", "text": "and this one?"}]}]
    bad_grid = build_inputs(processor, bad_prompt)["image_grid_thw"][0, 1:].tolist()
    visual = random_vl[0].model.visual
    real, calls = visual.forward, []

    def failing(pixels, grid_thw, **kwargs):  # the tower fails whenever the bad image is in its input
        calls.append(len(grid_thw))
        if any(g[1:] == bad_grid for g in grid_thw.tolist()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(pixels, grid_thw=grid_thw, **kwargs)

    monkeypatch.setattr(visual, "forward", failing)
    bad, tokens, results = together_with_one_bad(engine, processor, items, bad_prompt)
    assert bad == ("error", 500)
    assert all(kind == "done" for kind, _ in results) and tokens == expected
    assert calls[0] == 4  # the 3 good images and the bad one in one call (it failed: each row then encoded its own)
    assert_pool_all_back(engine)


def test_a_forward_that_fails_halfway_restarts_the_others_and_fails_the_culprit(engine, random_vl, monkeypatch):
    """The batched forward breaks at layer 1 (layer 0 already took slots and wrote entries) whenever the
    poisoned prompt's chunk is in it: the batch's requests run again alone, the others finish with their
    own tokens (those already streamed are not sent twice), the poisoned one fails alone, no slot is lost."""
    model, processor = random_vl
    tokenizer = processor.tokenizer
    mark = tokenizer.encode("#", add_special_tokens=False)[0]
    items = prompts(6)
    assert all(mark not in build_inputs(processor, p)["input_ids"][0].tolist() for p in items)
    expected = alone(engine, processor, items)
    poisoned = [{"role": "user", "content": "# tell me about it " * 4}]  # in its first chunk, beside the others' first chunks
    real = stepper_module.forward_rows
    armed = {"on": False}

    def breaks_at_layer_one(module, args, kwargs):
        if armed["on"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = text_decoder_layers(model)[1].register_forward_pre_hook(breaks_at_layer_one, with_kwargs=True)

    def forward(model_, cache, rows):
        armed["on"] = any(mark in r.ids.tolist() for r in rows)
        try:
            return real(model_, cache, rows)
        finally:
            armed["on"] = False

    monkeypatch.setattr(stepper_module, "forward_rows", forward)
    metrics = engine.metrics
    before = {k: metrics.get(k) for k in ("batch_failures_total", "requests_restarted_total", "kv_slots_reclaimed_total")}
    resolved = []  # a request's budget is resolved once, when it is submitted: a restart reads it from the request
    real_resolve = DBTrimKVConfig.resolve_budget

    def counted(self, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("dbtrimkv.serving"):
            resolved.append(1)
        return real_resolve(self, *args, **kwargs)

    monkeypatch.setattr(DBTrimKVConfig, "resolve_budget", counted)
    try:
        bad, tokens, results = together_with_one_bad(engine, processor, items, poisoned)
    finally:
        handle.remove()
    assert len(resolved) == len(items) + 1  # one per request submitted, none for the restarts
    assert bad == ("error", 500)
    assert all(kind == "done" for kind, _ in results) and tokens == expected
    assert metrics.get("batch_failures_total") - before["batch_failures_total"] == 2  # the batch, then it alone
    assert metrics.get("requests_restarted_total") - before["requests_restarted_total"] >= 2
    assert metrics.get("kv_slots_reclaimed_total") > before["kv_slots_reclaimed_total"]  # layer 0's slots came back
    assert_pool_all_back(engine)
    assert not any(g.solo for g in engine.groups.values())  # the solo batches went away with their requests
    assert alone(engine, processor, items[:2]) == expected[:2]  # and the engine serves on


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", "hot"),
    ("top_p", float("nan")), ("top_p", 0), ("top_p", float("-inf")), ("top_p", 1.5),
    ("seed", float("nan")), ("seed", 1.5), ("seed", 2**64),
    ("max_tokens", float("nan")), ("max_tokens", 0), ("max_completion_tokens", float("inf")),
])
def test_every_sampling_value_is_checked_and_the_400_names_the_field(field, value):
    """A NaN temperature once reached torch.multinomial and failed every request of its batch."""
    from dbtrimkv.serving.api_errors import BadRequest
    from dbtrimkv.serving.schema import ServerLimits, parse_chat_request

    limits = ServerLimits("m", CONFIG)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(BadRequest) as info:
        parse_chat_request(body, limits)
    assert info.value.param == field and f"'{field}'" in info.value.message
    with pytest.raises(ValueError, match="finite|must be"):  # the engine's own check (one owner: SamplingParams)
        SamplingParams(**{"max_tokens": 4, field.replace("max_completion_tokens", "max_tokens"): value})


@pytest.mark.parametrize("fails_on", ["token", "chunk"])
def test_a_session_turn_in_a_failed_batch_gets_503_and_its_retry_prefills_the_conversation(engine, random_vl,
                                                                                          monkeypatch, fails_on):
    """Pins what the stepper does to a request that continued a session when a forward fails under
    another request. `token`: the other request fails on its last prompt token, in the same forward
    as the turn's decoding: the turn's cached history went with the batch, so it is not restarted but
    answered 503 `batch_failed` (retry at once); the retry finds no session and prefills the whole
    conversation, answering what that conversation gets alone. `chunk`: the other request fails on a
    prompt chunk, which runs in a forward of its own (`Stepper.phases`): the turn is not in it and
    answers what it answers with no fault. The request at fault fails alone; no slot is lost."""
    from dbtrimkv.serving.api_errors import BatchFailed
    from dbtrimkv.serving.app import HTTPOptions
    from dbtrimkv.serving.submission import submit_chat
    from dbtrimkv.serving.schema import ServerLimits, parse_chat_request

    model, processor = random_vl
    limits = ServerLimits("m", CONFIG, max_tokens=4096)

    def prepare(messages, session_id=None, max_tokens=6):
        body = {"model": "m", "messages": messages, "temperature": 0, "ignore_eos": True, "max_tokens": max_tokens}
        if session_id is not None:
            body["session_id"] = session_id
        events: queue.Queue = queue.Queue()
        job, _ = submit_chat(engine, parse_chat_request(body, limits), events.put, HTTPOptions().max_prompt_tokens)
        return job, events

    def answered(job, events):
        kind, result = outcome(job, events)
        assert kind == "done", result
        return job.tracker.text

    first = [{"role": "user", "content": "tell me about it"}]
    reply = answered(*prepare(first, "s"))
    conversation = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and more?"}]
    alone_answer = answered(*prepare(conversation))  # the whole conversation, no session
    assert answered(*prepare(first, "ref")) == reply
    turn_alone = answered(*prepare(conversation, "ref", max_tokens=400))  # the turn, continuing its session

    real = stepper_module.forward_rows
    poisoned_job, widths = {}, []

    def forward(model_, cache, rows):
        job = poisoned_job.get("job")
        group = next((g for g in engine.groups.values() if g.cache is cache), None)
        if job is not None and group is not None and job in group.requests:
            width = rows[group.requests.index(job)].ids.numel()
            widths.append((width, len(rows)))
            if (width == 1) == (fails_on == "token"):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model_, cache, rows)

    monkeypatch.setattr(stepper_module, "forward_rows", forward)
    turn, turn_events = prepare(conversation, "s", max_tokens=400)
    assert turn.continues
    deadline = time.monotonic() + 60
    while turn.first_token_at is None and time.monotonic() < deadline:  # decoding when the poisoned prompt joins
        time.sleep(0.001)
    poisoned, poisoned_events = prepare([{"role": "user", "content": "tell me about it " * 4}])
    poisoned_job["job"] = poisoned
    if fails_on == "token":
        while (event := turn_events.get(timeout=60)).kind == "token":
            pass
        assert event.kind == "error" and isinstance(event.error, BatchFailed)
        assert (event.error.status, event.error.code, event.error.headers()) == (503, "batch_failed", {"Retry-After": "0"})
    assert outcome(poisoned, poisoned_events) == ("error", 500)  # restarted alone (token) or alone already (chunk)
    if fails_on == "token":
        assert (1, 2) in widths and widths[-1] == (1, 1)  # it failed beside the turn, then restarted alone
    if fails_on == "chunk":
        assert widths == [(widths[0][0], 1)] and widths[0][0] > 1  # its chunk ran without the decoding turn
        assert answered(turn, turn_events) == turn_alone and turn.cached_tokens > 0
    monkeypatch.setattr(stepper_module, "forward_rows", real)
    retry, retry_events = prepare(conversation, "s")
    if fails_on == "token":
        assert not retry.continues  # the session went with the batch
        assert answered(retry, retry_events) == alone_answer and retry.cached_tokens == 0
    else:
        assert not retry.continues  # the session moved on: it holds the 400-token turn now
        answered(retry, retry_events)
    assert not engine.running and not engine.waiting
    sessions = [engine.sessions.take(i) for i in engine.sessions.ids()]
    held = sum(s.parked.num_slots for s in sessions)
    assert held > 0 and engine.pool.capacity - engine.pool.num_free == held  # only the sessions' rows
    for session in sessions:
        engine.scheduler.free_session(session)
    assert_pool_all_back(engine)


def test_the_server_changes_the_pools_free_list_only_through_a_kv_store():
    """`KVStore` is the sole owner of the free list: the scheduler frees rows and reclaims through its store."""
    import re
    from pathlib import Path

    import dbtrimkv.serving

    for path in Path(dbtrimkv.serving.__file__).parent.glob("*.py"):
        assert not re.search(r"pool\.(release|released|pop)\(", path.read_text()), path.name
