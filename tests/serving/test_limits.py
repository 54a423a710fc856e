"""Limits of `dbtrimkv serve`: API key, queue overflow (429 + Retry-After), too large (413), shutdown (503)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from serving_helpers import image_message, start_server
from dbtrimkv.serving.app import HTTPOptions


@pytest.fixture(scope="module")
def server(recall_pipeline):
    http = HTTPOptions(api_key="secret", max_request_bytes=100_000, max_prompt_tokens=60)
    running = start_server(recall_pipeline, kv_memory=("bytes", 4_000_000), max_running=1, max_queue=1, http=http)
    yield running
    running.close()


def long_stream(server):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 4000, "ignore_eos": True, "stream": True}
    return httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30,
                        headers={"Authorization": "Bearer secret"})


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()
    assert [m.id for m in server.openai(api_key="secret").models.list()] == ["tiny-recall"]
    assert httpx.get(server.base_url + "/health").status_code == 200  # probes need no key


def wait_for(server, running: int, waiting: int) -> dict:
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if (m["dbtrimkv_requests_running"], m["dbtrimkv_requests_waiting"]) == (running, waiting):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.02)


def test_queue_overflow_gets_429_with_retry_after(server):
    client = server.openai(api_key="secret")
    with long_stream(server) as running:
        first = running.iter_lines()  # kept: a dropped iterator closes its connection
        assert next(first).startswith("data:")
        wait_for(server, running=1, waiting=0)
        with long_stream(server) as waiting:
            second = waiting.iter_lines()
            assert next(second).startswith("data:")
            wait_for(server, running=1, waiting=1)
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="tiny-recall", messages=image_message(), max_tokens=4)
            assert info.value.response.headers["retry-after"] == "1"
            assert "queue is full" in info.value.body["message"]
    m = server.wait_idle()
    assert m["dbtrimkv_kv_slots_in_use"] == 0
    assert m['dbtrimkv_requests_rejected_total{status="429"}'] == 1


def test_too_large_gets_413(server):
    client = server.openai(api_key="secret")
    long_text = [{"role": "user", "content": "x" * 200}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny-recall", messages=long_text, max_tokens=4)
    assert info.value.status_code == 413 and "--max-prompt-tokens" in info.value.body["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny-recall", messages=[{"role": "user", "content": "x" * 200_000}])
    assert info.value.status_code == 413 and "larger than 100000 bytes" in info.value.body["message"]


def test_shutting_down_gets_503(server):
    server.engine.stop()
    client = server.openai(api_key="secret")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="tiny-recall", messages=image_message(), max_tokens=4)
    assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
    assert httpx.get(server.base_url + "/health").status_code == 503
