"""OpenAI conventions on every path: error objects (404, 405, 413, 422, 429, 500, 503), `GET /v1/models/{id}`,
`model` required, fields the server cannot honour refused with a 400 naming them, usage counting cached
tokens inside the prompt, and messages without object reprs or server paths."""

from __future__ import annotations

import base64
import json
import math

import httpx
import openai
import pytest

from dbtrimkv.serving.api_errors import InternalError, scrub
from dbtrimkv.serving.app import HTTPOptions
from serving_helpers import image_message, start_server


@pytest.fixture(scope="module")
def server(recall_pipeline):
    running = start_server(recall_pipeline, kv_memory=("bytes", 4_000_000), http=HTTPOptions(max_request_bytes=200_000))
    yield running
    running.close()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert " at 0x" not in body["error"]["message"] and "/tmp" not in body["error"]["message"]
    return body["error"]


def post(server, body):
    """(NaN and Infinity are sent as JSON's common extension, as Python's json module writes them)"""
    return httpx.post(server.base_url + "/v1/chat/completions", content=json.dumps(body), timeout=30,
                      headers={"content-type": "application/json"})


def test_every_path_answers_with_an_openai_error_object(server):
    url = server.base_url
    missing = error_of(httpx.get(url + "/v1/nothing-here"), 404)
    assert missing["code"] == "not_found"
    # the message names the path asked for and the routes there are (no `<path>`: these hold no server detail)
    assert missing["message"] == "no route GET /v1/nothing-here; see GET /v1/models, POST /v1/chat/completions"
    wrong = httpx.get(url + "/v1/chat/completions")
    assert error_of(wrong, 405)["code"] == "method_not_allowed" and "POST" in wrong.headers["allow"]
    assert error_of(wrong, 405)["message"] == "GET is not allowed on /v1/chat/completions"
    assert error_of(httpx.post(url + "/v1/chat/completions", content=b"x" * 300_000), 413)["code"] == \
        "request_too_large"
    assert error_of(httpx.delete(url + "/v1/models"), 405)["type"] == "invalid_request_error"


def test_models_by_id(server):
    client = server.openai()
    assert client.models.retrieve("tiny-recall").id == "tiny-recall"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("n", 2), ("logprobs", True), ("top_logprobs", 3),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("presence_penalty", 0.5), ("frequency_penalty", float("nan")), ("logit_bias", {"1": 5}),
    ("reasoning_effort", "high"), ("best_of", 2), ("temperature", float("nan")), ("top_p", float("inf")),
])
def test_fields_it_cannot_honour_are_refused_naming_the_field(server, field, value):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 2, field: value}
    error = error_of(post(server, body), 400)
    assert error["param"] == field and field in error["message"]


def test_fields_at_their_defaults_and_bookkeeping_fields_are_accepted(server):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 2, "n": 1, "logprobs": False,
            "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0, "tools": [],
            "user": "me", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True, "temperature": 0}
    assert post(server, body).status_code == 200


def test_model_is_required(server):
    error = error_of(post(server, {"messages": image_message(), "max_tokens": 2}), 400)
    assert error["param"] == "model" and "'model' is required" in error["message"]


def test_cached_tokens_are_part_of_the_prompt(server):
    client = server.openai()
    history = image_message()
    first = client.chat.completions.create(model="tiny-recall", messages=history, max_tokens=16, temperature=0,
                                           extra_body={"session_id": "conv"})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and now?"}]
    second = client.chat.completions.create(model="tiny-recall", messages=history, max_tokens=4, temperature=0,
                                            extra_body={"session_id": "conv"})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert second.usage.total_tokens == second.usage.prompt_tokens + second.usage.completion_tokens


def test_messages_show_no_object_reprs_or_server_paths(server):
    video = "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 10).decode()
    body = {"model": "tiny-recall", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}]}]}
    error = error_of(post(server, body), 400)
    assert "the uploaded video" in error["message"] and ".video" not in error["message"]
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode()
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": image}}]
    error_of(post(server, body), 400)
    assert scrub("cannot read <_io.BytesIO object at 0x7f3a2c> at /tmp/tmpab12/x.video") == \
        "cannot read <object> at <path>"
    assert InternalError("failed on /home/server/secret.py").message == "failed on <path>"
    assert scrub("see https://example.com/a.png and data:image/png") == "see https://example.com/a.png and data:image/png"


def test_a_bug_while_preparing_a_request_is_one_clean_500(server, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("<object at 0xdeadbeef> /srv/dbtrimkv/x.py")

    monkeypatch.setattr("dbtrimkv.serving.app.parse_chat_request", broken)
    error = error_of(post(server, {"model": "tiny-recall", "messages": image_message()}), 500)
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert not math.isnan(server.metrics()['dbtrimkv_requests_rejected_total{status="500"}'])
