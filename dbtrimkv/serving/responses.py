"""OpenAI response objects: a chat completion, its streamed chunks, and the SSE framing.

Why: clients parse these exact shapes (`chat.completion`, `chat.completion.chunk`, a final usage
chunk when `stream_options.include_usage`, `data: [DONE]`). Server-specific facts (the session,
a notice that a session was dropped or restarted) go in an extra top-level `dbtrimkv` object,
which OpenAI clients keep as an extra field.
"""

from __future__ import annotations

import json
import time
import uuid


class Completion:
    def __init__(self, model: str, extra: dict | None = None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.extra = extra or {}

    def _base(self, obj: str) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.extra:
            out["dbtrimkv"] = self.extra
        return out

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return dict(self._base("chat.completion"), choices=[choice], usage=usage)

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return dict(self._base("chat.completion.chunk"), choices=[choice])

    def usage_chunk(self, usage: dict) -> dict:
        return dict(self._base("chat.completion.chunk"), choices=[], usage=usage)


def sse(data: dict | str) -> str:
    """One server-sent event carrying `data` (JSON, or a literal such as `[DONE]`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
