"""`dbtrimkv serve` through the official `openai` client: answers, streaming, batching, limits, sessions."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving_helpers import EXAMPLES, image_message, start_server

# Pool and views share 2 MiB: 3734 slots (an image chat's bound is 96 + 6 x ~50 entries: 9 fit) and
# 1092706 bytes of views (an image chat reserves 6 segments x 98 columns x 260 bytes + 48: 7 fit), so
# the views decide and under 16 clients some wait although their bound alone would fit.
KV_MEMORY = 2 * 2**20
POOL_SLOTS, VIEW_BYTES, CHAT_VIEWS = 3734, 1092706, 6 * (98 * 260 + 8)


@pytest.fixture(scope="module")
def server(recall_pipeline):
    running = start_server(recall_pipeline, kv_memory=("bytes", KV_MEMORY), max_running=16, max_queue=64)
    yield running
    running.close()


def ask(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 16)
    return client.chat.completions.create(model="tiny-recall", messages=messages, **kwargs)


def test_image_chat_answers_the_digit(server, recall_pipeline):
    out = ask(server.openai(), image_message("digit-911.png"))
    assert out.choices[0].message.content == "image:7"
    assert out.choices[0].finish_reason == "stop"
    expected = recall_pipeline.chat("which digit is in the image?", images=[EXAMPLES / "digit-911.png"], progress=False)
    assert out.usage.prompt_tokens == sum(expected.stats.prompt_tokens.values())
    assert out.usage.completion_tokens == len(expected.token_ids)  # image:7 and the end-of-turn token


def test_models_health_and_metrics(server):
    client = server.openai()
    assert [m.id for m in client.models.list()] == ["tiny-recall"]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    m = server.metrics()
    assert m["dbtrimkv_kv_pool_slots"] == POOL_SLOTS and m["dbtrimkv_kv_pool_bytes"] == POOL_SLOTS * 269
    assert m["dbtrimkv_kv_views_limit_bytes"] == VIEW_BYTES == KV_MEMORY - POOL_SLOTS * 269
    assert m["dbtrimkv_kv_memory_bytes"] == KV_MEMORY
    assert "dbtrimkv_time_to_first_token_seconds_count" in m


def test_streaming_chunks_join_to_the_answer(server):
    stream = ask(server.openai(), image_message("digit-912.png"), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "image:8"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_sixteen_concurrent_clients_get_their_answers_alone(server):
    files = ["digit-911.png", "digit-912.png", "digit-913.png"]
    prompts = [image_message(files[i % 3], "which digit is in the image?" + " " * (i // 3)) for i in range(16)]
    client = server.openai()
    alone = [ask(client, p, max_tokens=24).choices[0].message.content for p in prompts]
    samples, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(server.metrics())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda p: ask(server.openai(), p, max_tokens=24).choices[0].message.content, prompts))
    finally:
        stop.set()
        watcher.join()
    assert together == alone
    assert {a for a in alone} >= {"image:7", "image:8", "image:1"}
    final = server.wait_idle()
    pool_slots = final["dbtrimkv_kv_pool_slots"]
    assert all(s["dbtrimkv_kv_slots_in_use"] <= pool_slots for s in samples)
    assert all(s["dbtrimkv_kv_slots_reserved"] <= pool_slots for s in samples)
    assert 0 < final["dbtrimkv_kv_slots_in_use_peak"] <= pool_slots
    # pool + views never pass --kv-memory: in every /metrics sample and at every engine step
    assert all(s["dbtrimkv_kv_pool_bytes"] + s["dbtrimkv_kv_views_bytes"] <= KV_MEMORY for s in samples)
    assert all(s["dbtrimkv_kv_views_reserved_bytes"] <= VIEW_BYTES for s in samples)
    steps = list(server.engine.steps)
    assert steps and all(r.pool_bytes + r.views_bytes <= KV_MEMORY for r in steps)
    assert 0 < final["dbtrimkv_kv_views_bytes_peak"] == max(r.views_bytes for r in steps) <= VIEW_BYTES
    running = max(s["dbtrimkv_requests_running"] for s in samples)
    assert 1 < running <= VIEW_BYTES // CHAT_VIEWS == 7  # they ran together, as many as their views allow
    assert running * 396 < pool_slots  # the pool alone would have taken more: the views made them wait
    assert max(s["dbtrimkv_requests_waiting"] for s in samples) > 0
    assert final["dbtrimkv_kv_slots_in_use"] == 0 and final["dbtrimkv_kv_views_bytes"] == 0  # all came back


def test_malformed_requests_get_400_with_a_message(server):
    client = server.openai()
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
        (dict(messages=image_message(), temperature=5), "temperature"),
        (dict(messages=image_message(), max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]),
         "base64"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]),
         "--allow-media-dir"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
         "--allow-remote-media"),
        (dict(messages=image_message(), extra_body={"eviction": {"budget": 10**9}}), "budget"),
        (dict(messages=image_message(), extra_body={"eviction": {"policy": "nope"}}), "policy"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-recall", **kwargs)
        assert needle in info.value.body["message"], (kwargs, info.value.body)
    raw = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=image_message())


def test_per_request_eviction_settings(server, recall_pipeline):
    from dbtrimkv import DBTrimKVPipeline

    out = ask(server.openai(), image_message(), extra_body={"eviction": {"policy": "head", "memory_size": 8}})
    config = recall_pipeline.config.replace(policy="head", memory_size=8)
    tight = DBTrimKVPipeline(recall_pipeline.model, recall_pipeline.processor, config)
    expected = tight.chat("which digit is in the image?", images=[EXAMPLES / "digit-911.png"], progress=False,
                          max_new_tokens=16)
    assert out.choices[0].message.content == expected.text != "image:7"  # a tighter budget, its own answer


def test_disconnect_frees_slots_at_once(server):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"content":"i' in line:
                break
        busy = server.metrics()
        assert busy["dbtrimkv_requests_running"] == 1 and busy["dbtrimkv_kv_slots_in_use"] > 0
    start = time.monotonic()
    idle = server.wait_idle(timeout=5)
    assert idle["dbtrimkv_kv_slots_in_use"] == 0
    assert time.monotonic() - start < 5
    assert idle['dbtrimkv_requests_finished_total{reason="cancelled"}'] >= 1


def test_session_turn_two_prefills_only_the_new_tokens(server, recall_pipeline):
    client = server.openai()
    history = image_message("digit-913.png")
    first = ask(client, history, extra_body={"session_id": "s1"})
    assert first.choices[0].message.content == "image:1"
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "which digit is in the image?"}]
    before = server.metrics()["dbtrimkv_prompt_tokens_total"]
    second = ask(client, history, extra_body={"session_id": "s1"})
    tokenizer = recall_pipeline.tokenizer
    turn = recall_pipeline.build_inputs([history[-1]])["input_ids"].shape[1]
    new_tokens = 1 + len(tokenizer.encode("\n", add_special_tokens=False)) + turn  # end-of-turn token, newline, turn
    cached = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens == cached
    assert second.usage.prompt_tokens == cached + new_tokens  # OpenAI: the prompt counts its cached tokens
    assert server.metrics()["dbtrimkv_prompt_tokens_total"] - before == new_tokens
    conversation = recall_pipeline.conversation()
    conversation.send("which digit is in the image?", images=[EXAMPLES / "digit-913.png"], progress=False)
    expected = conversation.send("which digit is in the image?", progress=False)
    assert second.choices[0].message.content == expected.text  # same tokens as the Python API's conversation
    assert second.model_extra["dbtrimkv"] == {"session_id": "s1"}


def test_session_that_does_not_continue_restarts_with_a_notice(server):
    client = server.openai()
    ask(client, image_message("digit-911.png"), extra_body={"session_id": "s2"})
    out = ask(client, image_message("digit-912.png"), extra_body={"session_id": "s2"})
    assert out.choices[0].message.content == "image:8"
    assert "restarted" in out.model_extra["dbtrimkv"]["notice"]
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_raw_sse_framing(server):
    body = {"model": "tiny-recall", "messages": image_message(), "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_video_part_as_a_data_uri(server, video_mp4):
    uri = "data:video/mp4;base64," + base64.b64encode(video_mp4.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                             {"type": "text", "text": "which digit is in the video?"}]}]
    out = ask(server.openai(), messages)
    assert out.usage.prompt_tokens > 20 and out.choices[0].finish_reason in ("stop", "length")


def test_non_streaming_client_that_gives_up_frees_its_slots(server):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 4000, "ignore_eos": True}
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    idle = server.wait_idle(timeout=5)
    assert idle["dbtrimkv_kv_slots_in_use"] == before["dbtrimkv_kv_slots_in_use"]  # parked sessions only
    cancelled = 'dbtrimkv_requests_finished_total{reason="cancelled"}'
    assert idle[cancelled] == before.get(cancelled, 0) + 1
