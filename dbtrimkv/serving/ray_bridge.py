"""Call a replica's own FastAPI app in process, and merge the replicas' Prometheus texts.

Why: a Ray Serve replica must answer exactly what `dbtrimkv serve` answers, so it runs the same
app (`app.py`: validation, sessions, errors, streaming) instead of a second implementation; the
ingress hands it the HTTP request (method, path, headers, body) and streams back what the app
sends: first `{"status", "headers"}`, then body chunks. A consumer that stops reading (the client
went away) makes the app see `http.disconnect`, which cancels the request and frees its KV slots.

`merge_metrics` joins every replica's `/metrics` text into one exposition, each sample labelled
with its replica, each family's HELP / TYPE once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator


async def call_app(app, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> AsyncIterator:
    """Run one HTTP request through the ASGI `app`; yields the response start, then body chunks."""
    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda t: messages.put_nowait({"type": "app.done"}))
    try:
        while True:
            message = await messages.get()
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
            elif message["type"] == "app.done":
                if task.exception() is not None:
                    raise task.exception()
                return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the request is abandoned either way
                task.cancel()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (.*)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """One Prometheus text from `{replica id: its /metrics text}`: samples get `replica="id"`."""
    families: dict[str, list[str]] = {}  # family name -> HELP/TYPE lines then samples, in first-seen order
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                lines = families.setdefault(family, [])
                if line not in lines:
                    lines.append(line)
                continue
            match = _SAMPLE.match(line)
            if match is None or family is None:
                continue
            name, labels, value = match.groups()
            label = f'replica="{replica}"'
            labels = "{" + label + ("," + labels[1:-1] if labels and labels != "{}" else "") + "}"
            families[family].append(f"{name}{labels} {value}")
    return "".join(line + "\n" for lines in families.values() for line in lines)
