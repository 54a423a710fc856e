"""Bounded work before admission: oversized requests are refused before the server spends memory or
time in proportion to their size (two 40 MB text bodies once grew a server by 15 GB)."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from dbtrimkv.serving.api_errors import BadRequest, TooLarge
from dbtrimkv.serving.app import HTTPOptions
from dbtrimkv.serving.media_sources import MediaPolicy, load_image_url
from dbtrimkv.serving.request_bounds import PIECE_CHARS, check_text_tokens, parse_json
from serving_helpers import start_server
from soak_serve import oversize

BODY_MB, CLIENTS = 8, 4
# Resident memory one request may add while it is read, parsed and checked: its body and its text
# as one string (about 2x the body; docs/serving.md), for each of the concurrent requests, plus slack.
GROWTH_BOUND = CLIENTS * 3 * BODY_MB * 2**20 + 64 * 2**20


def test_several_maximum_size_bodies_at_once_are_refused_fast_in_bounded_memory():
    result = oversize(BODY_MB, CLIENTS)
    assert BODY_MB * 2**20 - 20 < result["body_bytes"] <= BODY_MB * 2**20
    assert [a["status"] for a in result["answers"]] == [413] * CLIENTS
    assert all("more than 32768 tokens" in a["message"] for a in result["answers"])
    assert max(a["seconds"] for a in result["answers"]) < 30  # (about 1 s each on an idle core; the whole prompt took minutes)
    assert result["peak_growth_mib"] * 2**20 < GROWTH_BOUND, result
    # a body without Content-Length is cut off as soon as it passes the limit
    assert result["unsized_status"] == 413 and "--max-request-mb" in result["unsized_message"]
    assert result["healthy"]


class CountingTokenizer:
    """One token per character; records how many characters it was asked to tokenize."""

    def __init__(self):
        self.chars = 0

    def encode(self, text, add_special_tokens=False):
        self.chars += len(text)
        return list(range(len(text)))


def test_text_is_counted_in_bounded_pieces_and_the_count_stops_early():
    tokenizer = CountingTokenizer()
    with pytest.raises(TooLarge, match="more than 1000 tokens"):
        check_text_tokens(tokenizer, ["word " * 2_000_000], 1000)
    assert tokenizer.chars <= 2 * PIECE_CHARS  # not the 10 MB: it stopped once surely over
    tokenizer = CountingTokenizer()
    check_text_tokens(tokenizer, ["a" * 30_000, "b" * 30_000], 60_000)  # at the limit: on to the exact count
    check_text_tokens(tokenizer, ["short"], 10)
    with pytest.raises(TooLarge):  # two cuts: refused once over the limit + 2 x 4 tokens of margin
        check_text_tokens(CountingTokenizer(), ["a" * 30_000, "b" * 30_001], 60_001 - 2 * 4 - 1)
    check_text_tokens(CountingTokenizer(), ["a" * 30_000, "b" * 30_001], 60_001 - 2 * 4)


def test_json_with_too_many_values_is_refused_before_parsing():
    with pytest.raises(BadRequest, match="commas"):
        parse_json(bytearray(b"[" + b'"ab",' * 1_000_001 + b'"ab"]'))
    with pytest.raises(BadRequest, match="JSON objects"):
        parse_json(bytearray(b"[" + b"{}," * 100_000 + b"{}]"))
    assert parse_json(bytearray(b'{"a": [1, 2]}')) == {"a": [1, 2]}
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json(bytearray(b"{nope"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` and whose pixels are missing (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def server(recall_pipeline):
    running = start_server(recall_pipeline, kv_memory=("bytes", 4_000_000), http=HTTPOptions(max_prompt_tokens=60))
    yield running
    running.close()


def test_media_are_refused_from_their_headers_and_by_the_requests_pixel_budget(server):
    url = server.base_url + "/v1/chat/completions"
    bomb = {"model": "tiny-recall", "messages": [{"role": "user", "content": [image_part(png_header_only(12_000, 12_000)),
                                                                            {"type": "text", "text": "hi"}]}]}
    start = time.monotonic()
    response = httpx.post(url, json=bomb, timeout=30)
    assert response.status_code == 413 and time.monotonic() - start < 5  # its header is over the pixel budget
    assert "pixels" in response.json()["error"]["message"]
    with pytest.raises(BadRequest) as info:  # without a budget, dbtrimkv.inputs.media refuses it from its header
        load_image_url("data:image/png;base64," + base64.b64encode(png_header_only(12_000, 12_000)).decode(),
                       MediaPolicy(), "messages[0].content[0]")
    assert "12000x12000" in info.value.message and " at 0x" not in info.value.message
    # 60 prompt tokens stand for at most 60 x 32 x 32 x 2 = 122880 decoded pixels: two 300x300 images pass it
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), "white").save(buffer, format="PNG")
    two = {"model": "tiny-recall", "messages": [{"role": "user", "content": [image_part(buffer.getvalue())] * 2}]}
    response = httpx.post(url, json=two, timeout=30)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]" and "122880 pixels" in error["message"]
