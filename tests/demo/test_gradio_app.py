"""The served demo, driven over HTTP with gradio_client like a browser would: answers, stats, limits."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import random_image
from PIL import Image

from dbtrimkv.pipeline import DBTrimKVPipeline

from demo_testing import MAX_UPLOAD_MB, QUEUE_SIZE, SERVED_BUDGET

# /chat returns (question, image, video, chat, live panel, patch overlay, heatmap, stats JSON, retention timeline)
CHAT, PANEL, OVERLAY, HEATMAP, STATS, TIMELINE = 3, 4, 5, 6, 7, 8


def ask(client, text, image=None, video=None, budget=SERVED_BUDGET, memory_size=0, policy="global", tokens=8):
    return client.predict(text, handle_file(str(image)) if image else None, handle_file(str(video)) if video else None,
                          budget, memory_size, policy, 0.01, tokens, api_name="/chat")


def texts(chat, role):
    return [part["text"] for m in chat if m["role"] == role for part in m["content"] if part["type"] == "text"]


@pytest.fixture
def client(served_demo):
    return Client(served_demo[1], verbose=False)


def test_served_with_safe_defaults(served_demo):
    demo, url = served_demo
    assert url.startswith("http://127.0.0.1:")
    assert demo.share is False
    assert demo.max_file_size == int(MAX_UPLOAD_MB * 2**20)
    assert demo._queue.default_concurrency_limit == 1 and demo._queue.max_size == QUEUE_SIZE
    assert demo.allowed_paths == []
    assert demo.analytics_enabled is False


def test_image_question_matches_the_pipeline(client, demo_pipeline, image_png):
    result = ask(client, "What is in this image?", image=image_png)
    chat, stats = result[CHAT], result[STATS]
    assert texts(chat, "user") == ["What is in this image?"]
    direct = DBTrimKVPipeline(demo_pipeline.model, demo_pipeline.processor, demo_pipeline.config.replace(
        budget=SERVED_BUDGET)).conversation().send("What is in this image?", images=[str(image_png)],
                                                   max_new_tokens=8, progress=False)
    assert texts(chat, "assistant") == [direct.text] and direct.text
    for key in ("prompt_tokens", "retained_entries", "kv_entries", "kv_entries_full", "kv_bytes", "new_tokens"):
        assert stats[key] == getattr(direct.stats, key), key
    assert stats["prompt_tokens"]["image"] > 0 and stats["budget"] == SERVED_BUDGET
    assert stats["kv_entries"] < stats["kv_entries_full"]
    assert f"{stats['kv_entries']} of {stats['kv_entries_full']} entries" in result[PANEL]
    assert f"{stats['tokens_per_second']:.1f} tokens/s" in result[PANEL]
    overlay = Image.open(result[OVERLAY])
    assert overlay.format == "PNG" and overlay.size == Image.open(image_png).size
    assert Image.open(result[HEATMAP]).format == "PNG"


def test_answer_streams(client, image_png):
    job = client.submit("Describe it.", handle_file(str(image_png)), None, SERVED_BUDGET, 0, "global", 0.01, 12,
                        api_name="/chat")
    job.result()
    replies = [texts(out[CHAT], "assistant")[-1] for out in job.outputs() if isinstance(out[CHAT], list)]
    assert len(replies) > 3 and replies[0] == ""  # the question shows first, then the answer grows
    assert all(b.startswith(a) for a, b in zip(replies, replies[1:])) and replies[-1]
    assert job.outputs()[-1][STATS]["new_tokens"] == 12


def test_changing_the_budget_changes_the_stats(client, image_png):
    small = ask(client, "Describe it.", image=image_png, budget=30)
    large = ask(client, "Describe it.", image=image_png, budget=600)
    assert small[STATS]["budget"] == 30 and large[STATS]["budget"] == 600
    assert small[STATS]["kv_entries"] < large[STATS]["kv_entries"] == large[STATS]["kv_entries_full"]
    assert small[STATS]["evictions"] >= 1 and large[STATS]["evictions"] == 0
    assert "budget 30 entries" in small[PANEL] and "budget 600 entries" in large[PANEL]
    assert "100.0%" in large[PANEL]
    assert texts(large[CHAT], "user") == ["Describe it."]  # new settings, new conversation
    by_memory = ask(client, "Describe it.", image=image_png, budget=30, memory_size=20)
    assert by_memory[STATS]["budget"] == 20 * 3 * 2  # memory size wins: layers x KV heads x M
    unlimited = ask(client, "Describe it.", budget=0)
    assert unlimited[STATS]["budget"] is None and "none (full cache)" in unlimited[PANEL]


def test_conversation_continues_until_reset(client, image_png):
    first = ask(client, "First question?", image=image_png, budget=600)
    second = ask(client, "And a follow-up?", budget=600)
    assert texts(second[CHAT], "user") == ["First question?", "And a follow-up?"]
    assert second[STATS]["kv_entries_full"] > first[STATS]["kv_entries_full"]  # the history is still cached
    assert second[STATS]["prompt_tokens"]["image"] == 0 and second[STATS]["retained_entries"]["image"] > 0
    assert Image.open(second[OVERLAY]).size == Image.open(image_png).size  # still the latest image
    chat, panel, *_ = client.predict(api_name="/new_conversation")
    assert chat == [] and "Send a question" in panel
    third = ask(client, "Fresh start?", budget=600)
    assert texts(third[CHAT], "user") == ["Fresh start?"] and third[OVERLAY] is None


def test_video_question(client, video_mp4):
    result = ask(client, "What happens in the clip?", video=video_mp4, budget=120)
    stats = result[STATS]
    assert stats["prompt_tokens"]["video"] > 0 and stats["new_tokens"] > 0
    assert stats["kv_entries"] == sum(stats["retained_entries"].values())
    assert texts(result[CHAT], "assistant")[0]
    timeline = Image.open(result[TIMELINE])  # video turns get a map too: the retention timeline
    assert timeline.format == "PNG" and timeline.size[0] > 800 and result[OVERLAY] is None


def test_long_video_is_refused_with_a_message(client, write_mp4, tmp_path):
    long_clip = write_mp4(tmp_path / "long.mp4", num_frames=48, fps=8)  # 6 s > 5 s
    with pytest.raises(AppError, match=r"This video is 6\.0 s long; the demo accepts videos up to 5 s"):
        ask(client, "What happens?", video=long_clip)


def test_empty_question_is_refused(client):
    with pytest.raises(AppError, match="Type a question first"):
        ask(client, "   ")


def test_uploads_are_bounded(served_demo, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
    with big.open("rb") as f:  # straight to the server, past the client's own size check
        reply = httpx.post(f"{served_demo[1]}gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert reply.status_code == 413 and "exceeded maximum allowed size of 1048576 bytes" in reply.text


def test_server_paths_are_never_opened(served_demo, tmp_path):
    secret = tmp_path / "secret.png"
    random_image(9).save(secret)
    url = served_demo[1]
    data = ["hi", {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, None, SERVED_BUDGET, 0, "global",
            0.01, 4]
    event = httpx.post(f"{url}gradio_api/call/chat", json={"data": data}).json()["event_id"]
    reply = httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=60).text
    assert "event: error" in reply and "not uploaded by a user" in reply


def test_launch_names_the_share_flag_not_gradios_keyword(demo_module, demo_pipeline, capsys):
    from demo_testing import free_port

    demo = demo_module.build_demo(demo_pipeline, max_video_seconds=5, max_new_tokens=4)
    _, url, _ = demo_module.launch(demo, port=free_port(), prevent_thread_lock=True)
    try:
        out = capsys.readouterr().out
    finally:
        demo.close()
    assert "share=True" not in out and "launch()" not in out
    assert f"Running on local URL:  {url}" in out and "dbtrimkv demo --share" in out
