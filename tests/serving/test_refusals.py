"""One message per refusal rule, whatever path applies it; a request's budget resolved once.

Each rule is applied on two or more paths (the command line before the model loads, the server's
start-up, the HTTP API per request, the pipeline's media loading); each test triggers the rule on
every path and checks the words are the same (numbers aside where the paths' numbers differ).
The apps here are never started (no engine thread): every refusal happens before a request queues.
"""

from __future__ import annotations

import base64
import re
import sys

import pytest
from fastapi.testclient import TestClient

from dbtrimkv import DBTrimKVConfig
from dbtrimkv.cli import main
from dbtrimkv.errors import ConfigError, MediaError
from dbtrimkv.inputs.images import load_image
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.serving import ServerOptions, create_server, refusals
from dbtrimkv.serving.api_errors import BadRequest, TooLarge, Unavailable, scrub
from dbtrimkv.serving.app import HTTPOptions
from dbtrimkv.serving.engine import Engine, EngineRequest
from dbtrimkv.serving.media_sources import MediaPolicy, load_image_url
from dbtrimkv.serving.request_bounds import check_text_tokens
from dbtrimkv.runner.sampling import SamplingParams
from test_bounded_work import png_header_only

pytestmark = pytest.mark.timeout(120)  # the apps never start: a request that wrongly got past its refusal would wait

URL = "/v1/chat/completions"
MEMORY = ("bytes", 4_000_000)


def cli_error(argv, monkeypatch, capsys, loads: bool = False) -> str:
    """The one `dbtrimkv: error:` line of `dbtrimkv serve ARGV` (the model must not load unless `loads`)."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    if not loads:
        monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_load)
    assert main(["serve", *argv]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("dbtrimkv: error: ")
    return line.removeprefix("dbtrimkv: error: ")


def words(message: str) -> str:
    return re.sub(r"\d+", "N", message)


@pytest.fixture(scope="module")
def strict(recall_pipeline):
    """An app (never started) with a 3-token prompt limit and 100 kB bodies."""
    options = ServerOptions(kv_memory=MEMORY, http=HTTPOptions(max_prompt_tokens=3, max_request_bytes=100_000))
    app, engine = create_server(recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config, options)
    return TestClient(app), engine


@pytest.fixture(scope="module")
def plain(recall_pipeline):
    """An app (never started) with the default limits."""
    app, engine = create_server(recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config,
                                ServerOptions(kv_memory=MEMORY))
    return TestClient(app), engine


def chat(client, messages, **body):
    response = client.post(URL, json={"model": "tiny-recall", "messages": messages, **body})
    return response.status_code, response.json()["error"]["message"]


def test_no_budget_from_the_flags_and_from_the_server(recall_pipeline, monkeypatch, capsys):
    flags = cli_error(["--full-cache"], monkeypatch, capsys)
    with pytest.raises(ConfigError) as info:
        create_server(recall_pipeline.model, recall_pipeline.processor, DBTrimKVConfig(),
                      ServerOptions(kv_memory=MEMORY))
    assert flags == str(info.value) == refusals.no_budget()


def test_prefill_chunk_over_the_step_budget_from_each_path(recall_pipeline, monkeypatch, capsys):
    flags = cli_error(["--prefill-chunk", "512", "--max-prefill-tokens-per-step", "256"], monkeypatch, capsys)
    model, processor, config = recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config
    with pytest.raises(ConfigError) as start:
        Engine(model, processor, config.replace(prefill_chunk=512), 4_000_000, max_prefill_tokens=256)
    engine = Engine(model, processor, config.replace(prefill_chunk=256), 4_000_000, max_prefill_tokens=256)
    request = EngineRequest("wide", build_inputs(processor, [{"role": "user", "content": "hi"}]),
                            config.replace(prefill_chunk=512), SamplingParams(max_tokens=1), lambda event: None)
    with pytest.raises(BadRequest) as per_request:
        engine.submit(request)
    assert flags == str(start.value) == per_request.value.message == refusals.chunk_over_step_budget(512, 256)


def test_a_request_over_the_pool_at_start_up_and_per_request(recall_pipeline, monkeypatch, capsys):
    flags = cli_error(["--kv-memory", "50KiB"], monkeypatch, capsys, loads=True)  # known once the model is
    model, processor, config = recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config
    engine = Engine(model, processor, config, 400_000)  # a one-token request fits, a long prompt does not
    long_prompt = build_inputs(processor, [{"role": "user", "content": "tell me more " * 200}])
    with pytest.raises(TooLarge) as per_request:
        engine.submit(EngineRequest("long", long_prompt, config, SamplingParams(max_tokens=1), lambda event: None))
    assert words(flags) == words(per_request.value.message) == words(refusals.over_pool(1, 1, 1, 1))
    assert flags != per_request.value.message  # the same words, each with its own numbers


def test_prompt_too_long_counted_in_pieces_or_whole(strict):
    client, engine = strict
    pieces = chat(client, [{"role": "user", "content": "tell me more " * 40}])  # its text alone is over
    whole = chat(client, [{"role": "user", "content": "hi"}])  # 2 characters; the rendered prompt is over
    with pytest.raises(TooLarge) as direct:
        check_text_tokens(engine.tokenizer, ["tell me more " * 40], 3)
    assert pieces == whole == (413, direct.value.message) == (413, refusals.prompt_too_long(3))


def test_body_too_large_declared_or_streamed(strict):
    client = strict[0]
    declared = client.post(URL, content=b"x" * 100_001)

    def pieces():
        for _ in range(11):
            yield b"x" * 10_000

    streamed = client.post(URL, content=pieces())  # no Content-Length
    assert "content-length" not in streamed.request.headers
    assert declared.status_code == streamed.status_code == 413
    assert declared.json()["error"]["message"] == streamed.json()["error"]["message"] == refusals.body_too_large(100_000)


def test_model_not_found_on_the_model_route_and_in_a_request(strict):
    client = strict[0]
    route = client.get("/v1/models/gpt-4")
    request = client.post(URL, json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert route.status_code == request.status_code == 404
    assert route.json()["error"]["message"] == request.json()["error"]["message"] == \
        refusals.model_not_found("gpt-4", "tiny-recall")


def test_budget_over_the_servers_from_http_and_from_the_engine(plain, recall_pipeline):
    client, engine = plain
    status, message = chat(client, [{"role": "user", "content": "hi"}], eviction={"budget": 10**9})
    request = EngineRequest("big", build_inputs(recall_pipeline.processor, [{"role": "user", "content": "hi"}]),
                            recall_pipeline.config.replace(budget=10**9, memory_size=None),
                            SamplingParams(max_tokens=1), lambda event: None)
    with pytest.raises(BadRequest) as direct:
        engine.submit(request)
    assert (status, message) == (400, direct.value.message) == (400, refusals.budget_over_server(10**9, engine.budget))


def test_media_too_large_as_a_data_uri_or_a_file(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 64)
    policy = MediaPolicy(allow_dir=tmp_path, max_bytes=16)
    messages = []
    for url in ("data:image/png;base64," + base64.b64encode(b"x" * 64).decode(), str(tmp_path / "big.png")):
        with pytest.raises(TooLarge) as info:
            load_image_url(url, policy, "messages[0].content[0]")
        messages.append(info.value.message)
    assert messages[0] == messages[1] == refusals.media_too_large("messages[0].content[0]", 16)


@pytest.mark.parametrize("data", [png_header_only(20_000, 20_000),  # PIL's bomb check, on the header
                                  png_header_only(12_000, 12_000),  # dbtrimkv's decode-bytes check
                                  b"not an image at all"])
def test_an_image_refused_by_the_pipeline_and_by_the_server_in_the_same_words(data):
    with pytest.raises(MediaError) as pipeline:
        load_image(data)
    where = "messages[0].content[0]"
    with pytest.raises(BadRequest) as server:
        load_image_url("data:image/png;base64," + base64.b64encode(data).decode(), MediaPolicy(), where)
    assert server.value.message == f"{where}: {scrub(str(pipeline.value))}"
    assert " at 0x" not in server.value.message


def test_shutting_down_from_health_the_api_and_the_engine(recall_pipeline):
    options = ServerOptions(kv_memory=MEMORY)
    app, engine = create_server(recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config, options)
    engine.stop()
    client = TestClient(app)
    health = client.get("/health")
    status, message = chat(client, [{"role": "user", "content": "hi"}])
    request = EngineRequest("late", build_inputs(recall_pipeline.processor, [{"role": "user", "content": "hi"}]),
                            recall_pipeline.config, SamplingParams(max_tokens=1), lambda event: None)
    with pytest.raises(Unavailable) as direct:
        engine.submit(request)
    assert (health.status_code, health.json()["error"]["message"]) == (status, message) == \
        (503, direct.value.message) == (503, refusals.shutting_down())


def test_a_requests_budget_is_resolved_once(recall_pipeline, monkeypatch):
    """The serving code resolves a request's budget once (`Scheduler.submit`) and reads `request.budget`
    after: a default request and one with its own `eviction` each cost one resolution. (A batch's cache
    resolves its own settings when it is built: that is per batch, not per request, and not counted.)"""
    calls = []
    real = DBTrimKVConfig.resolve_budget

    def counted(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("dbtrimkv.serving"):
            calls.append(caller)
        return real(self, *args, **kwargs)

    options = ServerOptions(kv_memory=MEMORY)
    app, engine = create_server(recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config, options)
    monkeypatch.setattr(DBTrimKVConfig, "resolve_budget", counted)
    with TestClient(app) as client:  # starts the engine
        for eviction in (None, {"policy": "head", "memory_size": 8}):
            body = {"model": "tiny-recall", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            response = client.post(URL, json=body if eviction is None else {**body, "eviction": eviction})
            assert response.status_code == 200, response.text
    assert calls == ["dbtrimkv.serving.scheduler"] * 2
