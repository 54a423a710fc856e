"""Bounded work before admission: a request is refused before the server spends memory or time in
proportion to its size.

Why: the whole request used to be read, parsed and tokenized before any limit applied, so two 40 MB
text bodies (under `--max-request-mb`) grew the server by 15 GB and stalled it for minutes. Here:
- the body is read in pieces and refused as soon as it passes `--max-request-mb` (also when the
  client sends no Content-Length);
- JSON is refused before parsing if it has more than `MAX_JSON_VALUES` commas, and while parsing
  past `MAX_JSON_OBJECTS` objects (millions of `{}` or `"ab"` values would cost 12-20x the body as
  Python objects; text parts are one string each, about their size in the body);
- the prompt's text is counted in tokens in bounded pieces (`PIECE_CHARS` characters at a time),
  stopping as soon as it is surely over `--max-prompt-tokens`: only then is the whole prompt
  tokenized, and at most a prompt the limit can hold;
- images and video frames are refused from their headers (`dbtrimkv.inputs.media`) and, per request, once
  their decoded pixels pass what `--max-prompt-tokens` visual tokens can cover (`MediaBudget`).
So one request holds at most about 3x `--max-request-mb` (body, parsed text, rendered prompt) plus
its media budget while it is prepared; docs/serving.md states the measured bound.
"""

from __future__ import annotations

import json

from . import refusals
from .api_errors import BadRequest, TooLarge

MAX_JSON_OBJECTS = 100_000
MAX_JSON_VALUES = 1_000_000  # commas: an upper bound on the values of arrays and objects (and text commas)
PIECE_CHARS = 16_384


async def read_body(request, max_bytes: int) -> bytearray:
    """The request body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(refusals.body_too_large(max_bytes))
    body = bytearray()  # grown in place: no second copy from joining pieces
    async for chunk in request.stream():
        if len(body) + len(chunk) > max_bytes:
            raise TooLarge(refusals.body_too_large(max_bytes))
        body += chunk
    return body


def parse_json(raw: bytearray):
    """The JSON body; 400 if it is not JSON or has more than `MAX_JSON_OBJECTS` objects."""
    if raw.count(b",") > MAX_JSON_VALUES:
        raise BadRequest(f"the request body has more than {MAX_JSON_VALUES} commas (JSON values or text): too many "
                         "to parse; a prompt that long is over any prompt limit")
    count = 0

    def counted(pairs):
        nonlocal count
        count += 1
        if count > MAX_JSON_OBJECTS:
            raise BadRequest(f"the request body has more than {MAX_JSON_OBJECTS} JSON objects")
        return dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=counted)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None


def check_text_tokens(tokenizer, texts: list[str], limit: int) -> None:
    """Refuse (413, from bounded work) text that surely holds more than `limit` tokens.

    The text is tokenized `PIECE_CHARS` characters at a time, cut at whitespace where there is some,
    and the count stops as soon as it passes `limit` plus a margin of 4 tokens per cut (a cut may
    change how the tokens next to it merge); a prompt under that goes on to the exact count."""
    total, cuts = 0, 0
    if sum(len(t) for t in texts) <= limit:  # at least one character per token: surely within the limit
        return
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + PIECE_CHARS)
            if end < len(text):
                space = max(text.rfind(c, start + PIECE_CHARS // 2, end) for c in " \n\t")
                end = space + 1 if space >= 0 else end
                cuts += 1
            total += len(tokenizer.encode(text[start:end], add_special_tokens=False))
            if total > limit + 4 * cuts:
                raise TooLarge(refusals.prompt_too_long(limit), param="messages")
            start = end


class MediaBudget:
    """Decoded image / video pixels one request may hold: what `max_tokens` visual tokens can cover."""

    def __init__(self, max_pixels: int | None):
        self.max_pixels, self.used = max_pixels, 0

    def spend(self, pixels: int, where: str) -> None:
        self.used += pixels
        if self.max_pixels is not None and self.used > self.max_pixels:
            raise TooLarge(f"{where}: the request's images and videos hold more than {self.max_pixels} pixels, more "
                           "than this server's prompt limit can take (--max-prompt-tokens)", param=where)
