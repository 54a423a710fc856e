"""`dbtrimkv serve --engine-process` (serving/engine_process.py): the engine in a process of its own
answers every request as the in-process server answers it (tokens, usage, sessions, refusals,
metrics), and a lost engine process fails what it held with one clear 503."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dbtrimkv.errors import ConfigError, ModelLoadError
from dbtrimkv.serving import ServerOptions, create_server
from dbtrimkv.serving.engine_process import launch_server
from dbtrimkv.serving.replica_spec import ReplicaSpec
from serving_helpers import RunningServer, image_message, start_server

OPTIONS = dict(kv_memory=("bytes", 64 * 2**20), max_running=8)


def process_server(pipeline, **options) -> RunningServer:
    spec = ReplicaSpec(None, None, None, {"config": pipeline.config}, ServerOptions(**{**OPTIONS, **options}))
    return RunningServer(*launch_server(spec))


@pytest.fixture(scope="module")
def servers(recall_pipeline):
    local, remote = start_server(recall_pipeline, **OPTIONS), process_server(recall_pipeline)
    yield local, remote
    local.close()
    remote.close()


def chat(server: RunningServer, messages, **body) -> dict:
    body = {"model": "tiny-recall", "messages": messages, "max_tokens": 12, "temperature": 0, **body}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    return {"status": response.status_code, "body": response.json()}


def streamed(server: RunningServer, messages, **body) -> tuple[str, list[dict]]:
    body = {"model": "tiny-recall", "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **body}
    chunks = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    return text, chunks


def answer(result: dict) -> tuple:
    body = result["body"]
    return body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"], body["usage"]


REQUESTS = [
    (image_message("digit-911.png"), {}),
    (image_message("digit-912.png"), {"max_tokens": 20, "ignore_eos": True}),
    ([{"role": "user", "content": "tell me a story about the sea"}], {"temperature": 0.9, "seed": 7}),
    ([{"role": "user", "content": "hello"}], {"top_p": 0.8, "temperature": 1.2, "seed": 3, "max_tokens": 30}),
]


def test_answers_equal_the_in_process_servers(servers):
    local, remote = servers
    alone = [answer(chat(local, messages, **body)) for messages, body in REQUESTS]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # batched together in the engine process
        together = list(pool.map(lambda r: answer(chat(remote, r[0], **r[1])), REQUESTS))
    assert together == alone
    assert alone[0][0] == "image:7" and alone[1][1] == "length" and alone[1][2]["completion_tokens"] == 20
    text, chunks = streamed(remote, REQUESTS[1][0], **REQUESTS[1][1])
    assert text == alone[1][0] and chunks[-1]["usage"] == alone[1][2]


def test_a_session_continues_in_the_engine_process(servers):
    replies = {}
    for server in servers:
        first = [{"role": "user", "content": "tell me about it"}]
        one = chat(server, first, session_id="s-ep", max_tokens=6)["body"]
        second = first + [{"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "and more?"}]
        two = chat(server, second, session_id="s-ep", max_tokens=6)["body"]
        assert two["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the history was not prefilled again
        replies[server] = (one["choices"], two["choices"], two["usage"])
    assert replies[servers[0]] == replies[servers[1]]


def test_refusals_and_metrics_are_the_in_process_servers(servers):
    local, remote = servers
    before = remote.metrics()
    bad = [
        ([{"role": "user", "content": "hi"}], {"temperature": "x"}),  # refused by the HTTP layer
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
         {}),  # an image that does not decode
        ([{"role": "user", "content": "hi " * 40000}], {}),  # a prompt over --max-prompt-tokens
    ]
    for messages, body in bad:
        expected = chat(local, messages, **body)
        assert expected["status"] in (400, 413)
        assert chat(remote, messages, **body) == expected
    chat(remote, [{"role": "user", "content": "hi"}], max_tokens=5, ignore_eos=True)
    after = remote.wait_idle()
    assert after["dbtrimkv_generation_tokens_total"] == before["dbtrimkv_generation_tokens_total"] + 5
    rejected = sum(after.get(f'dbtrimkv_requests_rejected_total{{status="{s}"}}', 0) for s in (400, 413))
    assert rejected == sum(before.get(f'dbtrimkv_requests_rejected_total{{status="{s}"}}', 0)
                           for s in (400, 413)) + len(bad)
    assert after["dbtrimkv_kv_pool_slots"] == local.metrics()["dbtrimkv_kv_pool_slots"] > 0


def test_a_lost_engine_process_fails_its_requests_with_503(recall_pipeline):
    server = process_server(recall_pipeline)
    try:
        body = {"model": "tiny-recall", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 5:
                        server.engine._process.kill()  # mid-answer
        assert events[-1]["error"]["type"] == "service_unavailable"
        assert "the engine process exited" in events[-1]["error"]["message"]
        health = httpx.get(server.base_url + "/health", timeout=10)
        assert health.status_code == 503 and "the engine process exited" in health.json()["error"]["message"]
        again = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert again.status_code == 503 and "the engine process exited" in again.json()["error"]["message"]
    finally:
        server.close()


def test_a_client_that_goes_away_leaves_nothing_behind(servers):
    """A stream cut by its client is cancelled in the engine process, and its sink is dropped here."""
    _, remote = servers
    body = {"model": "tiny-recall", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", remote.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
            for n, _line in enumerate(response.iter_lines()):
                if n == 6:
                    break
    after = remote.wait_idle(timeout=30)
    assert after["dbtrimkv_requests_running"] == 0 and remote.engine._sinks == {} and remote.engine._replies == {}


def unloadable():
    raise ModelLoadError("no such model: nowhere/nothing")


def test_the_engine_process_refuses_to_start_as_create_server_does(recall_pipeline):
    options = ServerOptions(kv_memory=("bytes", 50_000))
    with pytest.raises(ConfigError) as in_process:
        create_server(recall_pipeline.model, recall_pipeline.processor, recall_pipeline.config, options)
    with pytest.raises(ConfigError) as engine_process:
        launch_server(ReplicaSpec(None, None, None, {"config": recall_pipeline.config}, options))
    assert str(engine_process.value) == str(in_process.value)
    with pytest.raises(ModelLoadError, match="no such model: nowhere/nothing"):  # any DBTrimKVError, as itself
        launch_server(ReplicaSpec(None, None, None, {}, options, loader=unloadable))


def test_sessions_go_to_the_store_when_the_engine_process_stops(recall_pipeline, tmp_path):
    """`--session-store` with `--engine-process`: the engine process writes its parked sessions when the
    server stops, and a new server's engine process resumes them without prefilling the history again."""
    first = [{"role": "user", "content": "tell me about it"}]
    server = process_server(recall_pipeline, session_store=tmp_path)
    try:
        reply = chat(server, first, session_id="kept", max_tokens=6)["body"]["choices"][0]["message"]["content"]
    finally:
        server.close()
    assert len(list(tmp_path.iterdir())) == 1
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and more?"}]
    server = process_server(recall_pipeline, session_store=tmp_path)
    try:
        usage = chat(server, second, session_id="kept", max_tokens=6)["body"]["usage"]
    finally:
        server.close()
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
